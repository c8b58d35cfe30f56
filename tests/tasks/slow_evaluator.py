"""The digits task with an evaluator that takes a moment per trial: a search stays ``running`` long enough for
live views (event stream, dashboard, ``prunehub watch``) to be observed mid-run. The delay comes from
``PRUNEHUB_TEST_EVAL_DELAY`` (seconds, default 0.5)."""

import os
import time

from examples.digits import dummy_input, fine_tuner, model, trainer  # noqa: F401
from examples.digits import evaluator as _evaluator


def evaluator(net):  # type: ignore[no-untyped-def]
    time.sleep(float(os.environ.get("PRUNEHUB_TEST_EVAL_DELAY", "0.5")))
    return _evaluator(net)
