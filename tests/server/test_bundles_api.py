"""POST/GET /bundles and experiments that name a bundle, on SQLite and on PostgreSQL: content addressing, dedupe,
ownership, the upload's own streamed size limit, refused zips, and the switches that turn uploads off."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.api.main import create_app
from server.db.session import make_engine, make_session_factory
from server.services.auth import create_key
from server.services.bundle_archive import blob_path, bundle_id, make_bundle
from server.settings import Settings
from tests.bundle_tasks import SPEC, write_task_package
from tests.conftest import _reset_postgres

ZIP = {"Content-Type": "application/zip"}


class Api:
    def __init__(self, client: TestClient, keys: dict[str, str], settings: Settings) -> None:
        self.client, self.keys, self.settings = client, keys, settings

    def headers(self, who: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}", **extra}

    def upload(self, who: str, data: bytes) -> Any:
        return self.client.post("/bundles", content=data, headers=self.headers(who, **ZIP))

    def submit(self, who: str, **fields: Any) -> Any:
        return self.client.post("/experiments", json={**SPEC, **fields}, headers=self.headers(who))


def _make(tmp_path: Path, database_url: str, **overrides: Any) -> Iterator[Api]:
    settings = Settings(
        home=tmp_path, database_url=database_url, broker_url="filesystem://", artifacts_dir=tmp_path / "artifacts",
        allowed_entrypoints=["examples."], bootstrap_local_key=False, max_body_bytes=20_000, max_bundle_mb=1,
        max_bundle_files=100, **overrides,
    )
    with TestClient(create_app(settings)) as client:
        engine = make_engine(database_url)
        with make_session_factory(engine)() as session:
            keys = {"alice": create_key(session, "alice"), "bob": create_key(session, "bob"),
                    "admin": create_key(session, "ops", "admin")}
            session.commit()
        engine.dispose()
        yield Api(client, keys, settings)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/bundles.db"
    url = os.environ.get("PRUNEHUB_TEST_DATABASE_URL")
    if not url:
        pytest.skip("PRUNEHUB_TEST_DATABASE_URL not set")
    _reset_postgres(url)
    return url


@pytest.fixture
def api(tmp_path: Path, database_url: str) -> Iterator[Api]:
    yield from _make(tmp_path, database_url)


@pytest.fixture
def code(tmp_path: Path) -> bytes:
    return make_bundle(write_task_package(tmp_path / "src"))


def test_upload_is_content_addressed_deduplicated_and_owned(api: Api, code: bytes) -> None:
    first = api.upload("alice", code)
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["id"] == bundle_id(code) and body["size"] == len(code) and body["owner"] == "alice"
    assert body["modules"] == [
        "acme_tasks", "acme_tasks.data", "acme_tasks.needs_missing", "acme_tasks.probe", "acme_tasks.tiny"
    ]
    assert blob_path(api.settings.artifacts_dir, body["id"]).read_bytes() == code  # stored under its hash
    again = api.upload("alice", code)
    assert again.status_code == 200 and again.json() == body
    assert [b["id"] for b in api.client.get("/bundles", headers=api.headers("alice")).json()["items"]] == [body["id"]]
    # Another owner cannot see it, and uploading the same bytes makes their own bundle.
    assert api.client.get(f"/bundles/{body['id']}", headers=api.headers("bob")).status_code == 404
    assert api.client.get("/bundles", headers=api.headers("bob")).json()["items"] == []
    bobs = api.upload("bob", code)
    assert bobs.status_code == 201 and bobs.json()["id"] == body["id"] and bobs.json()["owner"] == "bob"
    assert api.client.get(f"/bundles/{body['id']}", headers=api.headers("alice")).json() == body
    assert not list((Path(api.settings.artifacts_dir) / "bundles" / ".incoming").iterdir())  # no upload left over


def test_listing_is_newest_first(api: Api, tmp_path: Path) -> None:
    ids = [api.upload("alice", make_bundle(write_task_package(tmp_path / f"v{i}", marker=str(i)))).json()["id"]
           for i in range(3)]
    listed = api.client.get("/bundles", headers=api.headers("alice")).json()["items"]
    assert [b["id"] for b in listed] == ids[::-1]
    assert [b["id"] for b in api.client.get("/bundles?limit=1", headers=api.headers("alice")).json()["items"]] == [
        ids[-1]
    ]


def test_experiments_use_only_their_owners_bundle_and_skip_the_allow_list(api: Api, code: bytes) -> None:
    bundle = api.upload("alice", code).json()["id"]
    created = api.submit("alice", bundle=bundle)
    assert created.status_code == 201, created.text  # acme_tasks is not under PRUNEHUB_ALLOWED_ENTRYPOINTS
    assert created.json()["bundle"] == bundle and created.json()["entrypoint"] == "acme_tasks.tiny"
    listed = api.client.get("/experiments", headers=api.headers("alice")).json()["items"]
    assert listed[0]["bundle"] == bundle
    # Another owner's bundle is as unknown as a missing one, and names the field.
    for who, digest in (("bob", bundle), ("alice", "sha256:" + "0" * 64)):
        refused = api.submit(who, bundle=digest)
        assert refused.status_code == 404 and refused.json()["field"] == "bundle", refused.text
    # An admin key does not lend another owner's code either.
    assert api.submit("admin", bundle=bundle).json()["field"] == "bundle"
    # The entrypoint must be a module of the bundle; without a bundle the allow-list applies as before.
    outside = api.submit("alice", bundle=bundle, entrypoint="acme_tasks.nothing_here")
    assert outside.status_code == 422 and outside.json()["field"] == "entrypoint"
    assert "acme_tasks.nothing_here" in outside.json()["detail"]
    assert api.submit("alice").json()["field"] == "entrypoint"
    malformed = api.submit("alice", bundle="md5:abc")
    assert malformed.status_code == 422 and "bundle" in str(malformed.json())


def test_the_upload_limit_applies_while_streaming_and_json_keeps_its_own(api: Api) -> None:
    limit = api.settings.max_bundle_bytes

    def chunks() -> Iterator[bytes]:  # no Content-Length: only counting the stream can stop it
        for _ in range(limit // 65536 + 2):
            yield b"\0" * 65536

    streamed = api.client.post("/bundles", content=chunks(), headers=api.headers("alice", **ZIP))
    assert streamed.status_code == 413 and str(limit) in streamed.json()["detail"]
    announced = api.upload("alice", b"\0" * (limit + 1))
    assert announced.status_code == 413
    # Under the bundle limit but over the JSON limit: fine for a bundle (refused as a non-zip), 413 elsewhere.
    assert api.upload("alice", b"\0" * 50_000).status_code == 422
    big_json = api.client.post("/experiments", json={**SPEC, "name": "x" * 50_000}, headers=api.headers("alice"))
    assert big_json.status_code == 413
    assert not list((Path(api.settings.artifacts_dir) / "bundles" / ".incoming").iterdir())


def test_refused_zips_name_the_entry_and_store_nothing(api: Api) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("acme/__init__.py", "")
        archive.writestr("../../escape.py", "")
    refused = api.upload("alice", buffer.getvalue())
    assert refused.status_code == 422
    assert refused.json() == {"detail": "bundle entry '../../escape.py': '..' components are refused", "field": "body"}
    not_zip = api.upload("alice", b"hello")
    assert not_zip.status_code == 422 and "not a valid zip" in not_zip.json()["detail"]
    wrong_type = api.client.post("/bundles", content=b"hello", headers=api.headers("alice"))
    assert wrong_type.status_code == 415
    assert api.client.get("/bundles", headers=api.headers("alice")).json()["items"] == []
    stored = Path(api.settings.artifacts_dir) / "bundles"
    assert [p for p in stored.rglob("*.zip") if ".incoming" not in p.parts] == []
    assert api.client.post("/bundles", content=b"x", headers=ZIP).status_code == 401


def test_bundles_can_be_turned_off(tmp_path: Path, code: bytes) -> None:
    for api in _make(tmp_path, f"sqlite:///{tmp_path}/off.db", bundles=False):
        refused = api.upload("alice", code)
        assert refused.status_code == 403 and "PRUNEHUB_BUNDLES=false" in refused.json()["detail"]
        assert api.client.get("/bundles", headers=api.headers("alice")).status_code == 403
        submitted = api.submit("alice", bundle=bundle_id(code))
        assert submitted.status_code == 403 and submitted.json()["field"] == "bundle"
        assert api.submit("alice", entrypoint="examples.digits").status_code == 201  # installed code still runs


def test_uploads_can_be_reserved_to_admin_keys(tmp_path: Path, code: bytes) -> None:
    for api in _make(tmp_path, f"sqlite:///{tmp_path}/admin.db", bundles_admin_only=True):
        refused = api.upload("alice", code)
        assert refused.status_code == 403 and "admin" in refused.json()["detail"]
        assert api.upload("admin", code).status_code == 201
        assert api.submit("admin", bundle=bundle_id(code)).status_code == 201
