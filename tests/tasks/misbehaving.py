"""Task modules whose evaluator misbehaves, selected by attribute: ``tests.tasks.misbehaving:hang`` etc."""

from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace

from examples import digits


def _task(evaluator):  # type: ignore[no-untyped-def]
    return SimpleNamespace(
        model=digits.model, dummy_input=digits.dummy_input, trainer=digits.trainer, evaluator=evaluator
    )


def _hang(model):  # type: ignore[no-untyped-def]
    time.sleep(600)
    return 1.0


def _abort(model):  # type: ignore[no-untyped-def]
    os.abort()


def _exit(model):  # type: ignore[no-untyped-def]
    sys.exit(3)


def _hog(model):  # type: ignore[no-untyped-def]
    hoard = []
    while True:
        hoard.append(bytearray(64 * 1024 * 1024))


hang = _task(_hang)
abort = _task(_abort)
exit_ = _task(_exit)
hog = _task(_hog)
