"""docker-compose.yml cannot run here (no Docker engine); it must still be valid and name what the code reads."""

from __future__ import annotations

from pathlib import Path

import yaml

from server.cli import build_parser
from server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_and_healthchecks() -> None:
    services = _compose()["services"]
    assert {"api", "worker", "worker-gpu-0", "worker-gpu-1", "redis", "postgres", "migrate"} <= set(services)
    for name in ("api", "redis", "postgres"):
        assert "healthcheck" in services[name], name
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["worker"]["command"][2:4] == ["--queues", "experiments"]  # the coordinator: no GPU
    for index in (0, 1):
        gpu = services[f"worker-gpu-{index}"]
        assert gpu["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert gpu["command"][-4:] == ["--queues", "evaluations", "--gpu", str(index)]
        devices = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["device_ids"] == [str(index)]
        assert "gpu" in devices[0]["capabilities"]
        assert "artifacts:/var/lib/prunehub/artifacts" in gpu["volumes"]  # one store shared by every worker
    for volume in ("postgres-data", "artifacts"):
        assert volume in _compose()["volumes"]


def test_the_api_and_every_worker_run_as_an_unprivileged_user() -> None:
    # Workers run uploaded task bundles as their own user (README, "Bring your own code").
    services = _compose()["services"]
    for name in ("api", "worker", "worker-gpu-0", "worker-gpu-1"):
        user = str(services[name].get("user", "root"))
        assert user not in ("root", "0") and not user.startswith("0:"), name
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "useradd" in dockerfile and f"USER {services['worker']['user']}" in dockerfile


def test_environment_names_what_the_settings_read() -> None:
    fields = {f"PRUNEHUB_{name.upper()}" for name in Settings.model_fields}
    for name, service in _compose()["services"].items():
        for key in service.get("environment", {}) or {}:
            if key.startswith("PRUNEHUB_"):
                assert key in fields, f"{name}: {key} is not a setting"
    api_env = _compose()["services"]["api"]["environment"]
    assert api_env["PRUNEHUB_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert api_env["PRUNEHUB_BROKER_URL"].startswith("redis://")
    assert api_env["PRUNEHUB_BOOTSTRAP_LOCAL_KEY"] == "false"  # production requires real keys
    assert api_env["PRUNEHUB_RUNNER"] == "distributed"


def test_commands_are_cli_commands() -> None:
    parser = build_parser()
    for service in _compose()["services"].values():
        command = service.get("command")
        if isinstance(command, list) and command and command[0] == "prunehub":
            parser.parse_args(command[1:])  # raises SystemExit on an unknown command or flag
    assert (ROOT / "Dockerfile").exists()
