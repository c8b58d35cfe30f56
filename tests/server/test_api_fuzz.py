"""A property-based fuzz of the OpenAPI schema (schemathesis) over every route, on SQLite and on PostgreSQL, with
every schemathesis check but one: no 5xx, every response (errors included) matches the declared schema, status
codes and headers, schema-invalid input is refused, and every 4xx is a JSON error that names the problem.

Left out: ``positive_data_acceptance`` (ST202, "a schema-valid request must be accepted"). Our request rules go
beyond what JSON Schema says: a config entry needs ``op_types`` or ``op_names``, an entrypoint must name an
importable task, a budget forbids ``sparsity`` in its entries, an upload must be a real zip, re-allocation needs a
finished sensitivity run. Such requests are schema-valid and rightly refused with a 422 naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from server.api.main import create_app
from server.settings import Settings

pytestmark = pytest.mark.integration


@schemathesis.check
def json_error_names_the_problem(ctx, response, case) -> None:  # type: ignore[no-untyped-def]
    if 400 <= response.status_code < 500:
        body = response.json()
        assert isinstance(body, dict) and body.get("detail"), f"{response.status_code} without a JSON detail"


@schemathesis.serializer("application/zip")
def zip_bytes(ctx, value) -> bytes:  # type: ignore[no-untyped-def]
    # POST /bundles takes raw bytes: the fuzzer's strings and bytes go as they are (mostly not zips: 422).
    return value if isinstance(value, bytes) else str(value).encode()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/fuzz.db"
    return str(request.getfixturevalue("services_env")["PRUNEHUB_DATABASE_URL"])


def test_every_route_survives_schema_fuzzing(tmp_path: Path, database_url: str) -> None:
    from schemathesis.checks import CHECKS, positive_data_acceptance

    checks = [check for check in CHECKS.get_all() if check is not positive_data_acceptance]
    app = create_app(
        Settings(
            home=tmp_path,
            database_url=database_url,
            broker_url="filesystem://",
            artifacts_dir=tmp_path / "artifacts",
            allowed_entrypoints=["examples."],
        )
    )
    with TestClient(app):  # runs the lifespan: migrations, engine, the local key
        headers = {"Authorization": f"Bearer {(tmp_path / 'api-key').read_text().strip()}"}
        # The event stream of a live experiment never ends by design: it is covered by test_events.py.
        schema = schemathesis.openapi.from_asgi("/openapi.json", app).exclude(path_regex=r".*/events$")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 9
        calls: list[int] = []
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def fuzz(case) -> None:  # type: ignore[no-untyped-def]
                response = case.call_and_validate(
                    headers=headers, checks=checks
                )
                calls.append(response.status_code)

            fuzz()
        assert len(calls) >= 5 * len(operations)  # the fuzzer really ran every route
        assert any(400 <= code < 500 for code in calls) and any(code < 300 for code in calls)
