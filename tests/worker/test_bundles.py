"""Bundled code on a worker: unpacked once per hash, verified, run in a task process whose environment holds no
secret and whose sys.path holds no service code; a parked task process never serves two bundles."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from pruning.search.configs import parse_algorithm_config
from server.db.migrate import upgrade
from server.db.models import Experiment
from server.db.session import make_engine, make_session_factory
from server.services.bundle_archive import BundleLimits, blob_path, bundle_id, make_bundle
from server.services.bundles import store_upload
from server.services.experiments import create_experiment
from server.settings import Settings
from tests.bundle_tasks import SPEC, write_task_package
from tests.conftest import ROOT
from worker import isolation
from worker.bundles import PASSED_ENV, BundleSource
from worker.runner import run_experiment

pytestmark = pytest.mark.integration

CONFIG = {k: v for k, v in SPEC.items() if k not in ("name", "entrypoint")}
SECRETS = {
    "PRUNEHUB_DATABASE_URL": "postgresql+psycopg://prunehub:secret@db/prunehub",
    "PRUNEHUB_BROKER_URL": "redis://:secret@redis:6379/0",
    "PRUNEHUB_API_KEY": "ph_secret",
    "AWS_SECRET_ACCESS_KEY": "secret",
}


@pytest.fixture
def worker_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Settings, sessionmaker[Session]]]:
    for name, value in SECRETS.items():  # what a production worker's environment holds
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # ignored by the isolated child
    url = f"sqlite:///{tmp_path}/worker.db"
    upgrade(url)
    settings = Settings(
        home=tmp_path, database_url=url, artifacts_dir=tmp_path / "artifacts", allowed_entrypoints=["examples."],
        worker_heartbeat_s=0.5, job_timeout_s=60,
    )
    engine = make_engine(url)
    yield settings, make_session_factory(engine)
    if isolation._idle is not None:  # the parked task process of the last test
        isolation._idle[1].close()
        isolation._idle = None
    engine.dispose()


def _upload(settings: Settings, factory: sessionmaker[Session], root: Path, owner: str = "alice") -> str:
    data = make_bundle(root)
    upload = root.parent / f"{bundle_id(data)[7:19]}.zip"
    upload.write_bytes(data)
    with factory() as session:
        bundle, _ = store_upload(
            session, owner=owner, upload=upload, digest=bundle_id(data), size=len(data),
            artifacts_dir=Path(settings.artifacts_dir),
            limits=BundleLimits(settings.max_bundle_bytes, settings.max_bundle_files),
        )
        session.commit()
        return bundle.digest


def _experiment(factory: sessionmaker[Session], bundle: str, entrypoint: str) -> int:
    with factory() as session:
        experiment = create_experiment(
            session, owner="alice", name=entrypoint, entrypoint=entrypoint, config=parse_algorithm_config(CONFIG),
            allowed_prefixes=["examples."], bundle=bundle,
        )
        session.commit()
        return experiment.id


def _run(settings: Settings, factory: sessionmaker[Session], experiment_id: int) -> Experiment:
    run_experiment(experiment_id, session_factory=factory, settings=settings, worker_id="test-worker")
    with factory() as session:
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None
        return experiment


def test_bundled_code_runs_without_secrets_and_without_the_service_on_its_path(
    worker_env: tuple[Settings, sessionmaker[Session]], tmp_path: Path
) -> None:
    settings, factory = worker_env
    bundle = _upload(settings, factory, write_task_package(tmp_path / "src"))
    experiment_id = _experiment(factory, bundle, "acme_tasks.probe")
    experiment = _run(settings, factory, experiment_id)
    assert experiment.status == "succeeded", experiment.error
    assert experiment.best_score is not None

    scratch = (tmp_path / "scratch" / f"experiment-{experiment_id}").resolve()
    probe = json.loads((scratch / "probe.json").read_text())
    env = probe["env"]
    assert set(env) <= {*PASSED_ENV, "HOME", "TMPDIR", "PRUNEHUB_HOME"} | {k for k in env if k.startswith("LC_")}
    assert not set(SECRETS) & set(env) and "PYTHONPATH" not in env
    assert not [value for value in env.values() if "secret" in value]
    assert env["HOME"] == env["PRUNEHUB_HOME"] == probe["cwd"] == str(scratch)
    assert env["PATH"] == os.environ["PATH"]

    code = (tmp_path / "bundle-cache" / bundle.removeprefix("sha256:") / "code").resolve()
    assert probe["sys_path"][0] == str(code)
    root = str(ROOT.resolve())
    assert root not in probe["sys_path"] and "" not in probe["sys_path"]
    # The interpreter's own folders may sit inside the checkout (CI's .venv); nothing else of it may be there.
    interpreter = tuple(str(Path(p).resolve()) + os.sep for p in {sys.prefix, sys.base_prefix})
    assert not [entry for entry in probe["sys_path"] if (entry == root or entry.startswith(root + os.sep))
                and not (entry + os.sep).startswith(interpreter)]
    assert probe["server_spec"] is False and probe["worker_spec"] is False  # the checkout's packages do not import
    assert not probe["pruning_file"].startswith(root + os.sep)  # the library comes through its link only
    assert Path(probe["pruning_file"]).resolve() == (ROOT / "pruning" / "__init__.py").resolve()


def test_a_missing_third_party_import_fails_with_the_modules_name(
    worker_env: tuple[Settings, sessionmaker[Session]], tmp_path: Path
) -> None:
    settings, factory = worker_env
    bundle = _upload(settings, factory, write_task_package(tmp_path / "src"))
    experiment = _run(settings, factory, _experiment(factory, bundle, "acme_tasks.needs_missing"))
    assert experiment.status == "failed"
    assert "'prunehub_missing_dependency_xyz'" in (experiment.error or "")
    assert "not installed on the worker; bundles cannot install packages" in (experiment.error or "")


def test_stored_bytes_that_do_not_match_the_id_are_refused(
    worker_env: tuple[Settings, sessionmaker[Session]], tmp_path: Path
) -> None:
    settings, factory = worker_env
    bundle = _upload(settings, factory, write_task_package(tmp_path / "src"))
    blob = blob_path(settings.artifacts_dir, bundle)
    blob.write_bytes(make_bundle(write_task_package(tmp_path / "other", marker="swapped")))
    experiment = _run(settings, factory, _experiment(factory, bundle, "acme_tasks.tiny"))
    assert experiment.status == "failed"
    assert f"bundle {bundle}: the stored bytes hash to sha256:" in (experiment.error or "")
    assert not (tmp_path / "bundle-cache" / bundle.removeprefix("sha256:")).exists()


def test_a_parked_task_process_serves_one_bundle_of_one_experiment(
    worker_env: tuple[Settings, sessionmaker[Session]], tmp_path: Path
) -> None:
    settings, factory = worker_env
    first = _upload(settings, factory, write_task_package(tmp_path / "one"))
    second = _upload(settings, factory, write_task_package(tmp_path / "two", marker="two"))

    def pid(bundle: str, experiment_id: int) -> int:
        source = BundleSource.of(bundle, experiment_id, settings)
        with isolation.task_process(
            "acme_tasks.tiny", [], artifacts_dir=str(settings.artifacts_dir), bundle=source
        ) as child:
            child.request("resolve", {"config": CONFIG})
            assert child.pid is not None
            return child.pid

    a = pid(first, 1)
    assert pid(first, 1) == a  # same bundle, same experiment: the parked process is reused
    b = pid(second, 1)
    assert b != a  # another bundle never gets it
    assert pid(second, 2) != b  # nor does another experiment with the same bundle
    # The unpacked copy is made once per hash and then only read.
    cache = tmp_path / "bundle-cache"
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith("library-")) == sorted(
        [first.removeprefix("sha256:"), second.removeprefix("sha256:")]
    )
