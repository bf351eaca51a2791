"""`diffspec serve`: an OpenAI-compatible HTTP server for every diffspec method.

    pip install -e '.[serve]' && diffspec serve --method fast-dllm --port 8000

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health, GET /metrics.
Per-request decoding options go under one extra field, validated like the CLI's flags:
`{"model": ..., "prompt": ..., "diffspec": {"method": "psd", "lossless": true}}`.
Streaming sends append-only text as it becomes final; requests with the same settings are
decoded together in one canvas (the queues in `scheduler.py`, decoding and output in
`engine.py`). The API key, draining on SIGTERM, request ids, metrics and the access log live in
`gate.py`, `metrics.py` and `app.serve`.
"""
from __future__ import annotations

from typing import Any

__all__ = ["ServeSettings", "create_app", "serve"]

INSTALL_HINT = ("diffspec serve needs FastAPI, uvicorn and prometheus-client: pip install -e '.[serve]' "
                "(or pip install fastapi uvicorn prometheus-client)")


def _app_module() -> Any:
    try:
        from . import app
    except ImportError as e:
        if getattr(e, "name", None) in ("fastapi", "starlette", "uvicorn", "pydantic", "prometheus_client"):
            raise ImportError(f"{INSTALL_HINT} ({e})") from None
        raise
    return app


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(_app_module(), name)
    raise AttributeError(name)
