"""A task module without an evaluator: the loader must name the missing function."""

from examples.digits import dummy_input, model  # noqa: F401
