"""Request guards that run before routing: what no route should ever see, refused with a 4xx naming the field.

* A body over ``max_bytes`` is a 413, whether it announced a ``Content-Length`` or arrived chunked: the body is
  read up to the limit here, so the framework's body parser never sees a truncated stream (it answered 400).
* A JSON body is parsed once here and refused with 422 when it holds what JSON has no standard spelling for
  (``NaN``, ``Infinity``, a number that overflows a double) or what the databases cannot store (a NUL character,
  which PostgreSQL text refuses; a lone UTF-16 surrogate, which no UTF-8 encoder writes). Python's ``json``
  module accepts all of these, and each used to surface later as a 500.
* Query parameters holding a NUL character are refused the same way (``?status=%00`` reached PostgreSQL).

The error body is the API's usual ``{"detail": ..., "field": ...}``; ``field`` is the offending location, e.g.
``body.config_list.0.sparsity`` or ``query.status``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

from fastapi.responses import JSONResponse

__all__ = ["RequestGuard", "unsafe_text", "validation_content"]


class _NonFinite:
    def __init__(self, text: str) -> None:
        self.text = text


def _parse_float(text: str) -> Any:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def unsafe_text(text: str) -> str | None:
    """Why ``text`` cannot be stored (a NUL, or a lone surrogate), or ``None`` when it can."""
    if "\x00" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone UTF-16 surrogate (not valid Unicode)"
    return None


def _problems(value: Any, path: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """(location, reason) of every value of a parsed JSON document the API refuses."""
    if isinstance(value, _NonFinite):
        yield ".".join(path), f"is {value.text}: numbers must be finite (JSON has no NaN or Infinity)"
    elif isinstance(value, str):
        reason = unsafe_text(value)
        if reason:
            yield ".".join(path), reason
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _problems(item, (*path, str(index)))
    elif isinstance(value, dict):
        for key, item in value.items():
            reason = unsafe_text(key)
            if reason:
                yield ".".join((*path, key.encode("utf-8", "backslashreplace").decode())), f"key {reason}"
            else:
                yield from _problems(item, (*path, key))


def _error(status: int, detail: str, field: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail, "field": field})


class RequestGuard:
    """Pure ASGI middleware applying the module's rules to every HTTP request (see the module docstring)."""

    def __init__(self, app: Any, max_bytes: int, routes: Mapping[tuple[str, str], int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        # Single routes, keyed by (method, path), with their own body limit (the bundle upload: a zip of up to
        # PRUNEHUB_MAX_BUNDLE_MB); every other request keeps max_bytes.
        self.routes = dict(routes or {})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.routes.get((scope.get("method", ""), scope.get("path", "").rstrip("/")), self.max_bytes)
        rejection = self._check_query(scope.get("query_string", b""))
        if rejection is None:
            for name, value in scope.get("headers", []):
                if name == b"content-length":
                    try:
                        announced = int(value)
                    except ValueError:
                        continue
                    if announced > limit:
                        rejection = self._too_large(limit)
        if rejection is not None:
            await rejection(scope, receive, send)
            return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        # Read the whole body (bounded) before the app does, then replay it.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._too_large(limit)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        rejection = self._check_body(scope, body)
        if rejection is not None:
            await rejection(scope, receive, send)
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # type: ignore[no-any-return]  # the disconnect, whenever it comes

        await self.app(scope, replay, send)

    @staticmethod
    def _too_large(limit: int) -> JSONResponse:
        return _error(413, f"request body over {limit} bytes", "body")

    @staticmethod
    def _check_query(query_string: bytes) -> JSONResponse | None:
        if not query_string:
            return None
        for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True, encoding="utf-8"):
            for text in (name, value):
                reason = unsafe_text(text)
                if reason:
                    shown = name.encode("utf-8", "backslashreplace").decode().replace("\x00", "\\x00")
                    return _error(422, f"query parameter {shown!r} {reason}", f"query.{shown}")
        return None

    @staticmethod
    def _check_body(scope: dict[str, Any], body: bytes) -> JSONResponse | None:
        content_type = b""
        for name, value in scope.get("headers", []):
            if name == b"content-type":
                content_type = value.split(b";", 1)[0].strip().lower()
        if not body or not (content_type == b"application/json" or content_type.endswith(b"+json")):
            return None
        try:
            document = json.loads(body, parse_float=_parse_float, parse_constant=_NonFinite)
        except (ValueError, RecursionError):
            return None  # not JSON at all: the route's parser answers with its own 422
        for field, reason in _problems(document, ("body",)):
            return _error(422, f"{field} {reason}", field)
        return None


def _json_safe(value: Any) -> bool:
    """Whether ``value`` serialises as standard JSON and stores as text (finite numbers, safe strings)."""
    if value is None or isinstance(value, bool | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return unsafe_text(value) is None
    if isinstance(value, list | tuple):
        return all(_json_safe(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and unsafe_text(k) is None and _json_safe(v) for k, v in value.items())
    return False


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def validation_content(errors: Sequence[Any]) -> dict[str, Any]:
    """The body of a 422 from request validation: FastAPI's ``detail`` list plus ``field``, the first error's
    location (``body.seed``, ``query.limit``).

    An error echoes its ``input`` only when that input is plain JSON: a value that cannot be serialised (NaN,
    a lone surrogate, an object) is left out, so reporting bad input can never itself fail with a 500.
    """
    detail = []
    for error in errors:
        item: dict[str, Any] = {
            "type": str(error.get("type", "value_error")),
            "loc": [part if isinstance(part, int) else _printable(str(part)) for part in error.get("loc", ())],
            "msg": _printable(str(error.get("msg", "invalid input"))),
        }
        if "input" in error and _json_safe(error["input"]) and len(json.dumps(error["input"])) <= 1000:
            item["input"] = error["input"]
        detail.append(item)
    field = ".".join(str(part) for part in detail[0]["loc"]) if detail else None
    return {"detail": detail, "field": field}
