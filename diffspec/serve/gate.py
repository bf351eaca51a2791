"""The server's front door, an ASGI middleware around the whole app.

For every HTTP request, in this order:

1. a request id (`req-…`, or the client's own `x-request-id` when it is a short token of
   letters, digits, `.`, `_`, `-`), returned as the `x-request-id` response header;
2. the API key, when the server has one: every path but `/health` needs
   `Authorization: Bearer KEY` (compared with `hmac.compare_digest`), else 401;
3. draining: once SIGTERM arrived, every path but `/health` and `/metrics` gets 503 (the
   requests admitted before it finish; `serve.app.DrainingServer` waits for them);
4. the app; an exception that escapes it becomes an OpenAI-shaped 500 here, so it too gets its
   request id, its metrics and its log line;
5. the request's metrics (status code, latency) and one access-log line.

Errors are OpenAI-shaped: `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from typing import Any, Awaitable, Callable

from starlette.requests import ClientDisconnect

from .errors import ApiError

log = logging.getLogger("diffspec.serve")
access_log = logging.getLogger("diffspec.serve.access")

REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Probes: open while draining, and not counted as requests in flight (a drain never waits for them).
PROBES = ("/health", "/metrics")

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, "invalid_request_error", None, "invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down and admits no new requests; send this request to another "
                    "replica or retry once it is back", "server_error", None, "shutting_down",
                    headers={"Connection": "close"})


def check_api_key(key: str | None, source: str = "--api-key") -> str | None:
    """A usable API key or None; anything that could not be sent in an Authorization header is refused."""
    if key is None:
        return None
    if not isinstance(key, str) or not key:
        raise ValueError(f"{source} is empty; give a key, or leave it unset to serve without one")
    if not all(33 <= ord(c) <= 126 for c in key):
        raise ValueError(f"{source} must be printable ASCII without spaces (it is sent as 'Authorization: Bearer KEY')")
    return key


class Gate:
    """Request ids, API key, draining, metrics and the access log, around `app` (see the module docstring)."""

    def __init__(self, app: Callable, service: Any, metrics: Any, api_key: str | None = None,
                 access_log_enabled: bool = True):
        self.app, self.service, self.metrics = app, service, metrics
        self.api_key = check_api_key(api_key)
        self.access_log_enabled = access_log_enabled
        # Requests (probes aside) from arrival until their metrics and log line are written; the event
        # loop's thread only. A drain ends when it is 0.
        self.in_flight = 0

    def authorized(self, scope: Scope) -> str | None:
        """None when the request may pass, else why not."""
        if self.api_key is None or scope["path"] == "/health":
            return None
        values = [v for k, v in scope.get("headers", []) if k == b"authorization"]
        if not values:
            return ("this server needs an API key: send the header 'Authorization: Bearer KEY' (the key given "
                    "to diffspec serve --api-key or DIFFSPEC_API_KEY)")
        scheme, _, token = values[0].decode("latin-1").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1"),
                                                                  self.api_key.encode("latin-1")):
            return "invalid API key: send the header 'Authorization: Bearer KEY' with the server's key"
        return None

    async def __call__(self, scope: Scope, receive: Callable, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        given = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-request-id"), "")
        rid = given if REQUEST_ID.fullmatch(given) else "req-" + uuid.uuid4().hex[:24]
        state = scope.setdefault("state", {})
        state["request_id"], state["t0"] = rid, t0
        sent = {"status": None, "bytes": 0}

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            elif message["type"] == "http.response.body":
                sent["bytes"] += len(message.get("body", b""))
            await send(message)

        counted = scope["path"] not in PROBES
        self.in_flight += counted
        try:
            why = self.authorized(scope)
            if why is not None:
                await self.reply(send_with_id, unauthorized(why))
                return
            if self.service.draining and counted:
                await self.reply(send_with_id, shutting_down())
                return
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            pass  # the client left while sending its body: nobody to answer (logged as 499)
        except Exception:
            log.exception("unhandled error on %s (request %s)", scope["path"], rid)
            if sent["status"] is None:
                await self.reply(send_with_id, ApiError(500, "internal error; see the server log (request id "
                                                        f"{rid})", "server_error", None, "internal_error"))
        finally:
            self.record(scope, rid, sent["status"], sent["bytes"], time.perf_counter() - t0)
            self.in_flight -= counted

    @staticmethod
    async def reply(send: Send, err: ApiError) -> None:
        body = json.dumps(err.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in err.headers.items()]
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def record(self, scope: Scope, rid: str, status: int | None, nbytes: int, seconds: float) -> None:
        """The request's metrics and access-log line (499: the client left before any response began)."""
        code = status if status is not None else 499
        if self.metrics is not None:
            from .metrics import endpoint_label

            endpoint = endpoint_label(scope["path"])
            self.metrics.requests.labels(endpoint, str(code)).inc()
            self.metrics.latency.labels(endpoint).observe(seconds)
        if self.access_log_enabled:
            client = scope.get("client")
            where = f"{client[0]}:{client[1]}" if client else "-"
            access_log.info("request_id=%s client=%s method=%s path=%s status=%d bytes=%d seconds=%.3f",
                            rid, where, scope.get("method", "-"), scope["path"], code, nbytes, seconds)
