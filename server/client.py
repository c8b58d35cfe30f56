"""A small Python client of the prunehub REST API (httpx). The CLI uses it; so can a notebook.

Example::

    from server.client import PrunehubClient

    with PrunehubClient("http://127.0.0.1:8000") as client:
        experiment = client.submit({
            "name": "digits-uniform", "entrypoint": "examples.digits", "algorithm": "uniform",
            "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}], "base_algo": "l1",
        })
        final = client.wait(experiment["id"])
        print(final["status"], client.best(experiment["id"])["distribution"])
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

__all__ = ["ApiError", "PrunehubClient", "TERMINAL_STATUSES"]

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class ApiError(RuntimeError):
    """The API answered with an error status; ``detail`` is its JSON error body."""

    def __init__(self, status_code: int, detail: Any) -> None:
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class PrunehubClient:
    def __init__(self, base_url: str, *, timeout: float = 30.0, api_key: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, headers=headers)

    def __enter__(self) -> PrunehubClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                detail = response.json()
            except ValueError:
                detail = response.text
            raise ApiError(response.status_code, detail)
        return response

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/readyz").json()  # type: ignore[no-any-return]

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        """POST /experiments: returns the stored experiment (``status: queued``)."""
        return self._request("POST", "/experiments", json=spec).json()  # type: ignore[no-any-return]

    def get(self, experiment_id: int) -> dict[str, Any]:
        return self._request("GET", f"/experiments/{experiment_id}").json()  # type: ignore[no-any-return]

    def list(self, **filters: Any) -> dict[str, Any]:
        params = {k: v for k, v in filters.items() if v is not None}
        return self._request("GET", "/experiments", params=params).json()  # type: ignore[no-any-return]

    def trials(self, experiment_id: int, **params: Any) -> dict[str, Any]:
        params = {k: v for k, v in params.items() if v is not None}
        return self._request("GET", f"/experiments/{experiment_id}/trials", params=params).json()  # type: ignore[no-any-return]

    def best(self, experiment_id: int, **params: Any) -> dict[str, Any]:
        params = {k: v for k, v in params.items() if v is not None}
        return self._request("GET", f"/experiments/{experiment_id}/best", params=params).json()  # type: ignore[no-any-return]

    def pareto(self, experiment_id: int) -> dict[str, Any]:
        return self._request("GET", f"/experiments/{experiment_id}/pareto").json()  # type: ignore[no-any-return]

    def cancel(self, experiment_id: int) -> dict[str, Any]:
        return self._request("POST", f"/experiments/{experiment_id}/cancel").json()  # type: ignore[no-any-return]

    def download_model(self, experiment_id: int) -> bytes:
        """The best pruned model as zip bytes (``model.safetensors`` + ``recipe.json``)."""
        return self._request("GET", f"/experiments/{experiment_id}/model").content

    def wait(
        self,
        experiment_id: int,
        *,
        timeout: float | None = None,
        interval: float = 1.0,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the experiment is terminal; ``on_update`` sees every polled state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            experiment = self.get(experiment_id)
            if on_update is not None:
                on_update(experiment)
            if experiment["status"] in TERMINAL_STATUSES:
                return experiment
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"experiment {experiment_id} still {experiment['status']} after {timeout}s")
            time.sleep(interval)
