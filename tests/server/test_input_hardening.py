"""Any input gives a 4xx naming the field, never a 5xx: hand-made cursors, non-finite numbers, NUL characters and
lone surrogates, event ids beyond 64 bits, entrypoints with a trailing newline, chunked bodies over the limit.

Each runs on SQLite and on PostgreSQL (NUL characters and out-of-range integers used to reach the driver there).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server.hardening import VALID, Api, running_api


@pytest.fixture(params=["sqlite", "postgresql"])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    with running_api(request.param, tmp_path, max_body_bytes=20_000) as api:
        created = api.client.post("/experiments", json=VALID, headers=api.auth())
        assert created.status_code == 201, created.text
        yield api


def _cursor(data: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode()


def _raw_post(api: Api, text: str) -> Any:
    return api.client.post(
        "/experiments", content=text.encode(), headers={**api.auth(), "content-type": "application/json"}
    )


@pytest.mark.parametrize(
    "position",
    [
        {"before_id": "1 OR 1=1"},
        {"before_id": float("nan")},
        {"before_id": 1e30},
        {"before_id": [1]},
        {"before_id": None},
        {"before_id": 2**40},
        {"offset": -1},
        {"offset": 2**40},
        {"offset": "0"},
        {"offset": True},
        [1, 2],
        "null",
    ],
)
def test_hand_made_cursors_are_422_naming_the_cursor(api: Api, position: Any) -> None:
    cursor = _cursor(position) if position != "null" else "bm90IGpzb24"  # base64 of "not json"
    for path, params in [
        ("/experiments", {}),
        ("/experiments", {"order_by": "best_score"}),
        ("/experiments/1/trials", {}),
        ("/experiments/1/trials", {"order_by": "score"}),
    ]:
        response = api.client.get(path, params={**params, "cursor": cursor}, headers=api.auth())
        assert response.status_code == 422, (path, params, response.text)
        assert response.json()["field"] == "cursor"


def test_cursors_the_api_returns_still_page(api: Api) -> None:
    for _ in range(2):
        assert api.client.post("/experiments", json=VALID, headers=api.auth()).status_code == 201
    first = api.client.get("/experiments", params={"limit": 2}, headers=api.auth()).json()
    second = api.client.get(
        "/experiments", params={"limit": 2, "cursor": first["next_cursor"]}, headers=api.auth()
    ).json()
    assert [e["id"] for e in first["items"]] == [3, 2] and [e["id"] for e in second["items"]] == [1]


@pytest.mark.parametrize(
    ("fragment", "field"),
    [
        ('"config_list": [{"sparsity": NaN, "op_types": ["Conv2d"]}]', "body.config_list.0.sparsity"),
        ('"algorithm": "annealing", "start_temperature": Infinity', "body.start_temperature"),
        ('"algorithm": "annealing", "start_temperature": -Infinity', "body.start_temperature"),
        ('"max_minutes": 1e400', "body.max_minutes"),  # overflows a double: Python's json reads it as inf
        ('"name": "\\ud800"', "body.name"),
        ('"name": "a\\u0000b"', "body.name"),
        ('"entrypoint": "examples.digits\\u0000"', "body.entrypoint"),
        ('"config_list": [{"sparsity": 0.5, "op_names": ["conv\\u0000"]}]', "body.config_list.0.op_names.0"),
        ('"algorithm": "admm", "layer_rho": {"conv\\u0000": 1.0}', "body.layer_rho.conv\x00"),
    ],
)
def test_non_finite_numbers_nul_and_lone_surrogates_in_bodies_are_422(api: Api, fragment: str, field: str) -> None:
    # A valid body with the fragment's keys repeated after it (the last occurrence of a JSON key wins).
    raw = json.dumps(VALID)[:-1] + ", " + fragment + "}"
    response = _raw_post(api, raw)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert [e["id"] for e in api.client.get("/experiments", headers=api.auth()).json()["items"]] == [1]


def test_a_validation_error_never_echoes_an_unserialisable_input() -> None:
    from server.api.guards import validation_content

    content = validation_content(
        [
            {"type": "greater_than", "loc": ("query", "x"), "msg": "bad", "input": float("nan")},
            {"type": "string_type", "loc": ("body", "name"), "msg": "bad \ud800", "input": "\ud800"},
            {"type": "int_type", "loc": ("body", "seed"), "msg": "bad", "input": "1"},
            {"type": "model_type", "loc": ("body",), "msg": "bad", "input": object()},
        ]
    )
    json.dumps(content, allow_nan=False).encode("utf-8")  # what the response does: must not raise
    assert [("input" in error) for error in content["detail"]] == [False, False, True, False]
    assert content["field"] == "query.x"


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/experiments", {"status": "queued\x00"}),
        ("/experiments", {"entrypoint": "examples.digits\x00"}),
        ("/experiments", {"algorithm": "\x00"}),
        ("/experiments/1/trials", {"status": "\x00"}),
        ("/experiments/1/trials", {"context": '{"iteration": "\x00"}'}),
    ],
)
def test_nul_in_a_filter_is_422_naming_it(api: Api, path: str, params: dict[str, str]) -> None:
    response = api.client.get(path, params=params, headers=api.auth())
    assert response.status_code == 422, response.text
    assert response.json()["field"] == f"query.{next(iter(params))}"


def test_non_finite_query_numbers_are_422_naming_the_parameter(api: Api) -> None:
    for value in ("nan", "inf", "-inf", "1e400"):
        response = api.client.get("/experiments/1/best", params={"max_flops_ratio": value}, headers=api.auth())
        assert response.status_code == 422, (value, response.text)
        assert response.json()["field"] == "query.max_flops_ratio"


def test_event_ids_beyond_64_bits_are_422_before_the_stream(api: Api) -> None:
    api.client.post("/experiments/1/cancel", headers=api.auth())  # terminal: a valid resume point ends the stream
    for params, headers, field in [
        ({"after": str(2**63)}, {}, "query.after"),
        ({"after": str(2**64)}, {}, "query.after"),
        ({}, {"Last-Event-ID": str(2**63)}, "Last-Event-ID"),
        ({}, {"Last-Event-ID": "-1"}, "Last-Event-ID"),
        ({}, {"Last-Event-ID": "1e3"}, "Last-Event-ID"),
    ]:
        response = api.client.get("/experiments/1/events", params=params, headers={**api.auth(), **headers})
        assert response.status_code == 422, (params, headers, response.text)
        assert response.json()["field"] == field
    # The largest id is a valid resume point on both databases: an empty, complete stream.
    for params, headers in [({"after": str(2**63 - 1)}, {}), ({}, {"Last-Event-ID": str(2**63 - 1)})]:
        response = api.client.get("/experiments/1/events", params=params, headers={**api.auth(), **headers})
        assert response.status_code == 200 and response.text == "retry: 2000\n\n"


def test_an_entrypoint_with_a_trailing_newline_is_422(api: Api) -> None:
    for entrypoint in ("examples.digits\n", "examples.digits\r\n", "examples.digits:_train_dense"):
        response = api.client.post("/experiments", json={**VALID, "entrypoint": entrypoint}, headers=api.auth())
        assert response.status_code == 422, (entrypoint, response.text)
        assert response.json()["field"] == "entrypoint"


def test_a_chunked_body_over_the_limit_is_413(api: Api) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"name": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}'

    response = api.client.post(
        "/experiments", content=chunks(), headers={**api.auth(), "content-type": "application/json"}
    )
    assert response.status_code == 413 and response.json()["field"] == "body"
