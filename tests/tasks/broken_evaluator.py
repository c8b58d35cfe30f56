"""A task whose evaluator raises: its experiment must fail with the reason, and the worker keep serving."""

from examples.digits import dummy_input, fine_tuner, model, trainer  # noqa: F401


def evaluator(net):  # type: ignore[no-untyped-def]
    raise RuntimeError("evaluator exploded on purpose")
