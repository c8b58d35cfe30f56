"""The bare FastAPI baseline for ``bench/service.py``: the same framework and server, no database, no broker.

``GET /experiments/{id}`` returns a constant body shaped like prunehub's; ``POST /experiments`` validates the body
as JSON and returns it with an id. Served by ``uvicorn bench.bare_app:app`` with the same options as ``prunehub
serve`` (one process).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

app = FastAPI()

_BODY = {
    "id": 1,
    "name": "bare",
    "owner": "anonymous",
    "entrypoint": "examples.digits",
    "algorithm": "uniform",
    "status": "queued",
    "progress": {"done": 0, "total": 1, "phase": None},
    "config": {},
    "best_score": None,
    "error": None,
    "attempts": 0,
    "created_at": "2024-01-01T00:00:00Z",
    "started_at": None,
    "finished_at": None,
}


@app.get("/experiments/{experiment_id}")
def get_experiment(experiment_id: int) -> dict[str, Any]:
    return {**_BODY, "id": experiment_id}


@app.post("/experiments", status_code=201)
def create_experiment(body: dict[str, Any]) -> dict[str, Any]:
    return {**_BODY, "config": body}
