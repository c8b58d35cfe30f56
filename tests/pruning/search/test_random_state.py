"""The generator state a strategy stores: packed, continued exactly, and the list form of earlier versions read."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from pruning.search.base import RandomState


def _drawn(rng: random.Random) -> list[float]:
    return [rng.random(), rng.uniform(-1, 1), rng.gauss(0, 1), float(rng.randrange(1000)), *rng.sample(range(50), 3)]


def test_a_restored_state_continues_the_stream_exactly() -> None:
    rng = random.Random(7)
    _drawn(rng)
    rng.gauss(0, 1)  # leaves gauss_next set: it is part of the state
    stored = RandomState.model_validate_json(RandomState.capture(rng).model_dump_json())
    assert stored.packed is not None and stored.internal is None
    assert _drawn(stored.restore()) == _drawn(rng)


def test_the_packed_form_is_less_than_half_the_json_of_the_list() -> None:
    rng = random.Random(3)
    packed = RandomState.capture(rng).model_dump_json(exclude_none=True)
    listed = RandomState(internal=list(rng.getstate()[1])).model_dump_json(exclude_none=True)
    assert len(packed) < len(listed) / 2


def test_the_list_form_of_earlier_versions_is_read() -> None:
    version, internal, gauss_next = random.Random(11).getstate()
    legacy = {"internal": list(internal), "gauss_next": gauss_next}  # a state stored before the packed form
    assert _drawn(RandomState.model_validate(legacy).restore()) == _drawn(random.Random(11))


def test_a_state_has_exactly_one_form() -> None:
    with pytest.raises(ValidationError, match="exactly one of internal and packed"):
        RandomState()
    packed = RandomState.seeded(1).packed
    with pytest.raises(ValidationError, match="exactly one of internal and packed"):
        RandomState(internal=[1, 2], packed=packed)
