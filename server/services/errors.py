"""Errors the services raise; the API maps them to HTTP status codes."""

from __future__ import annotations

__all__ = ["Conflict", "Forbidden", "InvalidInput", "NotFound", "ServiceError", "TooManyRequests"]


class ServiceError(Exception):
    """Base class. ``field`` names the offending input where there is one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class NotFound(ServiceError):
    pass


class InvalidInput(ServiceError):
    pass


class Conflict(ServiceError):
    pass


class Forbidden(ServiceError):
    """The caller may not do this at all here (a feature turned off, or reserved to admin keys)."""


class TooManyRequests(ServiceError):
    """A quota that frees up with time: the caller may retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, field: str | None = None, *, retry_after_s: int) -> None:
        super().__init__(message, field)
        self.retry_after_s = retry_after_s
