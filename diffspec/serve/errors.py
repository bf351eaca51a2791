"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""
from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error a client gets as JSON: 400 bad input, 404 unknown model, 429 queue full, 5xx ours."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def not_found(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(404, message, "invalid_request_error", param, code)


def queue_full(retry_after: int, queued: int) -> ApiError:
    return ApiError(429, f"the server's queue is full ({queued} rows waiting); retry in about {retry_after} s",
                    "rate_limit_error", None, "queue_full", headers={"Retry-After": str(retry_after)})


def server_error(message: str) -> ApiError:
    return ApiError(500, message, "server_error", None, "internal_error")
