"""A small Python client of the prunehub REST API (httpx). The CLI uses it; so can a notebook.

Example::

    from server.client import PrunehubClient

    with PrunehubClient("http://127.0.0.1:8000") as client:
        experiment = client.submit({
            "name": "digits-uniform", "entrypoint": "examples.digits", "algorithm": "uniform",
            "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}], "base_algo": "l1",
        })
        for event in client.events(experiment["id"]):  # live, until the experiment is terminal
            print(event["kind"], event)
        print(client.get(experiment["id"])["status"], client.best(experiment["id"])["distribution"])
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
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
        return _checked(self._http.request(method, path, **kwargs))

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/readyz").json()  # type: ignore[no-any-return]

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        """POST /experiments: returns the stored experiment (``status: queued``)."""
        return self._request("POST", "/experiments", json=spec).json()  # type: ignore[no-any-return]

    def upload_bundle(self, path_or_dir: str | os.PathLike[str]) -> dict[str, Any]:
        """Upload a task bundle and return its metadata (``id``, ``size``, ``modules``, ...).

        ``path_or_dir`` is a zip file, sent as it is, or a folder, zipped deterministically first
        (:func:`server.services.bundle_archive.make_bundle`: the same files give the same id). When the server
        already has a bundle of yours with these bytes, that one is returned and nothing is sent.

        Example::

            bundle = client.upload_bundle("src")  # src/acme_tasks/...
            client.submit({**spec, "bundle": bundle["id"], "entrypoint": "acme_tasks.resnet"})
        """
        from server.services.bundle_archive import bundle_id, make_bundle

        source = Path(path_or_dir)
        data = make_bundle(source) if source.is_dir() else source.read_bytes()
        response = self._http.get(f"/bundles/{bundle_id(data)}")
        if response.status_code == 200:
            return response.json()  # type: ignore[no-any-return]
        return self._request(  # type: ignore[no-any-return]
            "POST", "/bundles", content=data, headers={"Content-Type": "application/zip"}
        ).json()

    def bundles(self, limit: int = 100) -> dict[str, Any]:
        """GET /bundles: your bundles, newest first."""
        return self._request("GET", "/bundles", params={"limit": limit}).json()  # type: ignore[no-any-return]

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

    def events(
        self,
        experiment_id: int,
        last_event_id: int | None = None,
        *,
        reconnect: bool = True,
        read_timeout: float = 60.0,
    ) -> Iterator[dict[str, Any]]:
        """The experiment's live events, oldest first, until it is terminal and every event was seen.

        Each event is a dict: ``id`` (its place in the append-only log), ``kind`` (``status``, ``progress``,
        ``trial``, ``best``, ``problem``), ``created_at`` and the kind's fields, e.g. ``{"kind": "trial",
        "seq": 3, "score": 0.97, "overall_sparsity": 0.5, "context": {...}}``. Pass ``last_event_id`` to start
        after an event you already have. A dropped connection is resumed from the last event received
        (``Last-Event-ID``), so nothing is missed or repeated; ``reconnect=False`` raises instead.

        Example::

            for event in client.events(7):
                if event["kind"] == "trial":
                    print(event["seq"], event["score"])
        """
        last = last_event_id
        retry_s = 2.0
        timeout = httpx.Timeout(self._http.timeout.connect or 30.0, read=read_timeout)
        while True:
            headers = {"Last-Event-ID": str(last)} if last is not None else {}
            try:
                with self._http.stream(
                    "GET", f"/experiments/{experiment_id}/events", headers=headers, timeout=timeout
                ) as response:
                    for message in _parse_sse(_checked(response).iter_lines()):
                        if "retry" in message:
                            retry_s = message["retry"] / 1000.0
                            continue
                        if message.get("id") is not None:
                            last = max(last or 0, int(message["id"]))
                        if message.get("data"):
                            event = json.loads(message["data"])
                            event.setdefault("kind", message.get("event", "message"))
                            yield event
                return  # the server ended the stream: the experiment is terminal
            except httpx.TransportError:  # a dropped or refused connection (RemoteProtocolError included)
                if not reconnect:
                    raise
                time.sleep(retry_s)

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


def _checked(response: httpx.Response) -> httpx.Response:
    """The response, or ApiError with its JSON error body (its text when not JSON) for a status of 400 or more."""
    if response.status_code >= 400:
        response.read()  # a streamed response's body is not read yet
        try:
            detail = response.json()
        except ValueError:
            detail = response.text
        raise ApiError(response.status_code, detail)
    return response


def _parse_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Server-sent-event messages from a stream's lines: dicts with ``data``, ``event``, ``id`` and/or ``retry``."""
    message: dict[str, Any] = {}
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                message["data"] = "\n".join(data)
            if message:
                yield message
            message, data = {}, []
            continue
        if line.startswith(":"):
            continue  # a comment: the keepalive
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            data.append(value)
        elif field in ("id", "event"):
            message[field] = value
        elif field == "retry" and value.isdigit():
            message["retry"] = int(value)
    if data:
        message["data"] = "\n".join(data)
    if message:
        yield message
