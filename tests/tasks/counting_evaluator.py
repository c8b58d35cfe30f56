"""The digits task with an evaluator that appends one line per call to ``PRUNEHUB_TEST_COUNT_FILE`` (before
sleeping ``PRUNEHUB_TEST_EVAL_DELAY`` seconds, default 0.5): how often jobs really ran, counted outside the
database. Each line is ``<pid>``."""

import os
import time

from examples.digits import dummy_input, fine_tuner, model, trainer  # noqa: F401
from examples.digits import evaluator as _evaluator


def evaluator(net):  # type: ignore[no-untyped-def]
    with open(os.environ["PRUNEHUB_TEST_COUNT_FILE"], "a") as log:
        log.write(f"{os.getpid()}\n")
    time.sleep(float(os.environ.get("PRUNEHUB_TEST_EVAL_DELAY", "0.5")))
    return _evaluator(net)
