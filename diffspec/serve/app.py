"""The FastAPI app: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics; and `serve`,
which runs it under uvicorn with a graceful shutdown (SIGTERM drains, see `DrainingServer`)."""
from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, check_batching
from .scheduler import Job, Prompt
from .errors import ApiError, bad_request, not_found, server_error
from .gate import Gate, check_api_key
from .metrics import CONTENT_TYPE_LATEST, Metrics
from ..api import checkpoint_dir
from .protocol import RequestParser, RequestPlan, new_id, now

log = logging.getLogger("diffspec.serve")


@dataclass
class ServeSettings:
    """`diffspec serve`'s options. `options` are the decoding defaults (CLI flags, None = not given)
    that apply to requests that keep `method`."""

    model: str | None = None
    method: str = "vanilla"
    options: dict[str, Any] = field(default_factory=dict)
    device: str | None = "cpu"
    dtype: str | None = None
    compile: str | None = None  # torch.compile backend for the model's forward (--compile)
    quantize: str | None = None  # "int8": the blocks' matmuls in int8 on the CPU (--quantize)
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16
    batch_window: float = 0.02
    batching: str = "auto"  # step-level (requests join a running batch), static, or auto: step on CUDA (--batching)
    prompt_bucket: int = 32  # step batching: prompt columns a canvas reserves, rounded up to this (--prompt-bucket)
    max_queue: int = 256
    model_name: str | None = None
    # production: API key (None = open), graceful shutdown, request size limits (None = only the model's own)
    api_key: str | None = None
    drain_timeout: float = 30.0
    limit_prompt_tokens: int | None = None
    limit_max_tokens: int | None = None
    limit_n: int | None = None
    limit_body_bytes: int = 1 << 20
    access_log: bool = True


def check_settings(s: ServeSettings) -> None:
    """The production options, checked before anything is loaded (errors name the CLI flag)."""
    if s.max_batch < 1 or s.max_queue < 1 or not s.batch_window >= 0:
        raise ValueError("--max-batch and --max-queue must be >= 1 and --batch-window >= 0")
    check_batching(s.batching, s.prompt_bucket, ("--batching", "--prompt-bucket"))
    check_api_key(s.api_key)
    if isinstance(s.drain_timeout, bool) or not isinstance(s.drain_timeout, (int, float)) \
            or not (math.isfinite(s.drain_timeout) and s.drain_timeout >= 0):
        raise ValueError(f"--drain-timeout must be a finite number of seconds >= 0, got {s.drain_timeout!r}")
    for flag, v, optional in (("--limit-prompt-tokens", s.limit_prompt_tokens, True),
                              ("--limit-max-tokens", s.limit_max_tokens, True), ("--limit-n", s.limit_n, True),
                              ("--limit-body-bytes", s.limit_body_bytes, False)):
        if v is None and optional:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{flag} must be an integer >= 1, got {v!r}")


class Service:
    """The served model, its request parser and its batching engine."""

    def __init__(self, settings: ServeSettings, model: Any = None, tokenizer: Any = None):
        from ..api import resolve_model
        from ..decoding.capabilities import capabilities
        from ..evaluation.evaluate import task_config
        from ..methods import get_method
        from ..models.chat import ChatTemplate, load_chat_template, load_special_tokens

        self.settings = s = settings
        opts = {k: v for k, v in s.options.items() if v is not None}
        get_method(s.method)
        self.default_cfg = task_config("arith", s.method, **opts)  # bad defaults fail before loading anything
        check_settings(s)
        if s.limit_max_tokens is not None and int(self.default_cfg.gen_length) > s.limit_max_tokens:
            raise ValueError(f"the server's default gen_length ({int(self.default_cfg.gen_length)}) is beyond "
                             f"--limit-max-tokens ({s.limit_max_tokens}); lower --gen-length or raise the limit")
        self.draining = False  # set by SIGTERM (DrainingServer): new requests get 503
        self.model, self.tokenizer = resolve_model(model if model is not None else s.model, tokenizer, s.device,
                                                   s.dtype, method=s.method, compile=s.compile,
                                                   quantize=s.quantize)
        caps = capabilities(self.model)
        self.family = caps.family
        ckpt = checkpoint_dir(s.model if model is None else model, s.method)
        template = load_chat_template(ckpt) if ckpt is not None else None
        self.chat_template = ChatTemplate(template, load_special_tokens(ckpt)) if template else None
        if s.model_name:
            self.model_id = s.model_name
        elif ckpt is not None:
            self.model_id = "smollm2" if s.model == "smollm2" else ckpt.name
        else:
            self.model_id = type(self.model).__name__.lower()
        self.parser = RequestParser(s.method, opts, self.family, s.max_batch, self.chat_template,
                                    limit_n=s.limit_n, limit_max_tokens=s.limit_max_tokens)
        self.engine = Engine(self.model, self.tokenizer, max_batch=s.max_batch, batch_window=s.batch_window,
                             max_queue=s.max_queue, dtype=s.dtype, batching=s.batching,
                             prompt_bucket=s.prompt_bucket)
        self.max_positions, self.eos_ids, self.mask_id = caps.max_positions, caps.eos_ids, caps.mask_id
        self.vocab = getattr(self.model.config, "vocab_size", None)

    # -- requests

    def check_model(self, body: Any) -> None:
        if isinstance(body, dict) and not isinstance(body.get("model", ""), (str, type(None))):
            raise bad_request("model must be a string (GET /v1/models lists the one served)", "model")
        if isinstance(body, dict) and body.get("model") not in (None, "", self.model_id):
            raise not_found(f"the model {body.get('model')!r} does not exist; this server serves {self.model_id!r} "
                            "(GET /v1/models)", "model", "model_not_found")

    def encode(self, plan: RequestPlan, chat: bool) -> list[Prompt]:
        param = "messages" if chat else "prompt"
        out = []
        for text in plan.prompts:
            ids = self.tokenizer.encode(text)
            if not ids:
                raise bad_request(f"the {param} encodes to no tokens; give some text", param, "empty_prompt")
            if self.mask_id is not None and self.mask_id in ids:
                raise bad_request(f"the {param} contains the mask token (id {self.mask_id}); remove it", param,
                                  "invalid_prompt")
            if self.vocab is not None and max(ids) >= self.vocab:
                raise bad_request(f"the {param} has token id {max(ids)} beyond the model's {self.vocab}", param,
                                  "invalid_prompt")
            limit = self.settings.limit_prompt_tokens
            if limit is not None and len(ids) > limit:
                raise bad_request(f"the {param} has {len(ids)} tokens, more than this server accepts ({limit}, "
                                  "diffspec serve --limit-prompt-tokens); shorten it", param, "prompt_too_long")
            if len(ids) + plan.gen_length > self.max_positions:
                raise bad_request(
                    f"the {param} has {len(ids)} tokens; with {plan.gen_length} to generate that is "
                    f"{len(ids) + plan.gen_length}, beyond the model's {self.max_positions} positions; shorten it "
                    "or lower max_tokens", param, "context_length_exceeded")
            out.append(Prompt(text, ids))
        return out

    def job(self, body: Any, chat: bool) -> tuple[Job, RequestPlan]:
        self.check_model(body)
        plan = self.parser.plan(body, chat)
        prompts = self.encode(plan, chat)
        eos = self.eos_ids
        stop_at_eos = getattr(getattr(plan.cfg, "decode", plan.cfg), "stop_at_eos", True)
        job = Job(plan.method, plan.cfg, prompts, plan.n, plan.stops, eos if stop_at_eos else (),
                  asyncio.get_running_loop(), info=plan.info)
        return job, plan

    def info(self, plan: RequestPlan) -> dict[str, Any]:
        return {"method": plan.method, "gen_length": plan.gen_length, "config": plan.cfg.to_dict()}

    def health(self) -> dict[str, Any]:
        return {"status": "draining" if self.draining else "ok", "model": self.model_id, "family": self.family, "method": self.settings.method,
                "chat_template": "checkpoint" if self.chat_template else "Question/Answer (diffspec generate's)",
                "queue_rows": self.engine.queue_depth(), "running_rows": self.engine.running_rows(),
                "max_batch": self.engine.max_batch,
                "batch_window": self.engine.batch_window, "batching": self.engine.batching,
                "max_queue": self.engine.max_queue,
                "stats": asdict(self.engine.stats)}


# ---------------------------------------------------------------- response bodies


def _choice(chat: bool, index: int, text: str, reason: str | None) -> dict[str, Any]:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": reason}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}


def _chunk(rid: str, created: int, model: str, chat: bool, index: int, text: str | None,
           reason: str | None = None, role: bool = False, usage: bool = False) -> dict[str, Any]:
    if chat:
        delta: dict[str, Any] = {}
        if role:
            delta = {"role": "assistant", "content": ""}
        elif text:
            delta = {"content": text}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
           "model": model, "choices": [choice]}
    if usage:
        out["usage"] = None
    return out


def _sse(obj: Any) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


# ---------------------------------------------------------------- the app


def create_app(settings: ServeSettings | None = None, model: Any = None, tokenizer: Any = None) -> FastAPI:
    """The app, with the model loaded (errors in the settings or the checkpoint raise here, before any
    port is bound). `model` / `tokenizer` may be loaded objects (tests) instead of `settings.model`."""
    settings = settings or ServeSettings()
    service = Service(settings, model, tokenizer)
    metrics = Metrics(service)
    gate = Gate(None, service, metrics, settings.api_key, settings.access_log)
    metrics.attach(gate)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.engine.start()
        try:
            yield
        finally:
            service.engine.stop()

    app = FastAPI(title="diffspec", description="OpenAI-compatible server for diffspec's decoding methods",
                  lifespan=lifespan)
    app.state.service = service
    app.state.gate = gate
    app.state.metrics = metrics

    def wrap(app: Any) -> Gate:  # the outermost middleware inside Starlette's error handler (older
        gate.app = app  # Starlettes pass `app=` by name)
        return gate

    app.add_middleware(wrap)  # type: ignore[arg-type]
    _add_error_handlers(app)
    _add_routes(app, _Handlers(service, metrics))
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's JSON error body."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse({"error": {"message": str(e.detail), "type": kind, "param": None, "code": code}},
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(bad_request(str(e)))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(server_error(f"internal error ({type(e).__name__}); see the server log"))


def _add_routes(app: FastAPI, h: "_Handlers") -> None:
    service, metrics = h.service, h.metrics

    @app.get("/health")
    async def health():
        body = service.health()
        return JSONResponse(body, status_code=503) if service.draining else body

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [h.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != service.model_id:
            raise not_found(f"the model {model_id!r} does not exist; this server serves {service.model_id!r}",
                            "model", "model_not_found")
        return h.model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await h.handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await h.handle(request, chat=True)


class _Handlers:
    """What the completion endpoints do: read the body, queue the job, then collect its events into
    one response or stream them as server-sent events, minding the request's timeout and its client."""

    def __init__(self, service: Service, metrics: Metrics):
        self.service, self.metrics, self.settings = service, metrics, service.settings

    def model_card(self) -> dict[str, Any]:
        service = self.service
        return {"id": service.model_id, "object": "model", "created": int(service.engine.stats.started),
                "owned_by": "diffspec", "diffspec": {"family": service.family, "method": service.settings.method,
                                                     "default_config": service.default_cfg.to_dict()}}

    async def body_of(self, request: Request) -> Any:
        limit = self.settings.limit_body_bytes
        too_large = ApiError(413, f"the request body is larger than this server accepts ({limit} bytes, diffspec "
                                  "serve --limit-body-bytes)", "invalid_request_error", None, "request_too_large")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large  # refused before reading it
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad_request(f"the request body is not valid JSON ({e})") from None

    def first_text(self, request: Request, chat: bool) -> Any:
        """A callback that records the request's time to first token, once."""
        t0 = request.scope.get("state", {}).get("t0", time.perf_counter())
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        seen = [False]

        def observe() -> None:
            if not seen[0]:
                seen[0] = True
                self.metrics.ttft.labels(endpoint).observe(time.perf_counter() - t0)
        return observe

    @staticmethod
    def deadline_of(request: Request, plan: RequestPlan) -> float | None:
        """perf_counter time at which the request's `timeout` (seconds from its arrival) runs out."""
        if plan.timeout is None:
            return None
        return request.scope.get("state", {}).get("t0", time.perf_counter()) + plan.timeout

    def timed_out(self, job: Job, plan: RequestPlan) -> ApiError:
        self.service.engine.cancel(job)  # its rows leave the canvas / the queue
        return ApiError(408, f"the request did not finish within its timeout ({plan.timeout:g} s); its decoding "
                             "was stopped", "timeout_error", "timeout", "request_timeout")

    @staticmethod
    async def next_event(job: Job, deadline: float | None, poll: float | None = None) -> tuple | None:
        """The job's next event; None when `poll` seconds (or the time left to `deadline`) pass first."""
        wait = poll
        if deadline is not None:
            left = max(0.0, deadline - time.perf_counter())
            wait = left if wait is None else min(wait, left)
        if wait is None:
            return await job.events.get()
        try:
            return await asyncio.wait_for(job.events.get(), timeout=wait)
        except asyncio.TimeoutError:
            return None

    async def handle(self, request: Request, chat: bool):
        body = await self.body_of(request)
        job, plan = self.service.job(body, chat)
        self.service.engine.submit(job)  # 429 here when the queue is full
        rid, created = new_id(chat), now()
        headers = {"X-Diffspec-Method": plan.method, "X-Diffspec-Gen-Length": str(plan.gen_length)}
        deadline = self.deadline_of(request, plan)
        if plan.stream:
            return StreamingResponse(self.stream(job, plan, rid, created, chat, self.first_text(request, chat),
                                                 deadline),
                                     media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache"})
        return await self.collect(request, job, plan, rid, created, chat, headers, deadline)

    async def collect(self, request: Request, job: Job, plan: RequestPlan, rid: str, created: int, chat: bool,
                      headers: dict[str, str], deadline: float | None):
        service = self.service
        texts = [""] * job.n_choices
        reasons: list[str | None] = [None] * job.n_choices
        ttft = self.first_text(request, chat)
        checked = time.perf_counter()
        try:
            while True:
                ev = await self.next_event(job, deadline, poll=0.5)
                if ev is None and deadline is not None and time.perf_counter() >= deadline:
                    if not job.done:
                        return _error_response(self.timed_out(job, plan))
                    deadline = None  # it finished just in time: its last events are on their way
                if ev is None or time.perf_counter() - checked >= 0.5:  # every half second, events or not
                    checked = time.perf_counter()
                    if not job.done and await request.is_disconnected():
                        service.engine.cancel(job)
                        return JSONResponse({}, status_code=499)
                if ev is None:
                    continue
                if ev[0] in ("delta", "finish"):
                    ttft()
                if ev[0] == "delta":
                    texts[ev[1]] += ev[2]
                elif ev[0] == "finish":
                    reasons[ev[1]] = ev[2]
                elif ev[0] == "error":
                    return _error_response(ev[1])
                elif ev[0] == "done":
                    usage = ev[1]
                    break
        finally:
            if not job.done:
                service.engine.cancel(job)
        body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": service.model_id, "choices": [_choice(chat, i, t, r) for i, (t, r) in
                                                        enumerate(zip(texts, reasons))],
                "usage": usage, "diffspec": {**service.info(plan), "batch_rows": usage["diffspec"]["batch_rows"]}}
        return JSONResponse(body, headers=headers)

    async def stream(self, job: Job, plan: RequestPlan, rid: str, created: int, chat: bool,
                     ttft: Any, deadline: float | None) -> AsyncIterator[str]:
        model_id, usage_field = self.service.model_id, plan.include_usage
        try:
            if chat:
                for i in range(job.n_choices):
                    yield _sse(_chunk(rid, created, model_id, chat, i, None, role=True, usage=usage_field))
            while True:
                ev = await self.next_event(job, deadline)
                if ev is None:  # the request's timeout passed
                    if job.done:
                        deadline = None  # it finished just in time: its last events are on their way
                        continue
                    yield _sse(self.timed_out(job, plan).body())
                    yield "data: [DONE]\n\n"
                    return
                if ev[0] in ("delta", "finish"):
                    ttft()
                if ev[0] == "delta":
                    yield _sse(_chunk(rid, created, model_id, chat, ev[1], ev[2], usage=usage_field))
                elif ev[0] == "finish":
                    last = _chunk(rid, created, model_id, chat, ev[1], None, reason=ev[2], usage=usage_field)
                    last["diffspec"] = {"method": plan.method, "gen_length": plan.gen_length}
                    yield _sse(last)
                elif ev[0] == "error":
                    yield _sse(ev[1].body())
                    yield "data: [DONE]\n\n"
                    return
                elif ev[0] == "done":
                    if plan.include_usage:
                        yield _sse({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                    "created": created, "model": model_id, "choices": [], "usage": ev[1]})
                    yield "data: [DONE]\n\n"
                    return
        finally:  # the client went away (the task is cancelled) or the stream ended
            if not job.done:
                self.service.engine.cancel(job)


def _draining_server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server with a graceful shutdown. The first SIGTERM (or SIGINT) starts draining: the
        listening socket stays open and every new request but /health and /metrics gets an OpenAI-shaped
        503 (/health answers 503 with status "draining", so a load balancer takes the replica out); the
        requests admitted before it finish, for up to `drain_timeout` seconds (queued ones start at once:
        the batch window stops waiting for companions that will not come); requests still unfinished
        then get a 503 error (as a JSON body, or as the stream's last event); then the server exits with
        status 0. A second signal stops it at once. The signal is not raised again after the shutdown
        (uvicorn's default), so a drained server exits 0 rather than by the signal."""

        def __init__(self, config: Any, app: FastAPI, drain_timeout: float):
            super().__init__(config)
            self.service, self.gate = app.state.service, app.state.gate
            self.drain_timeout = drain_timeout
            self.drain_started: float | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.drain_started is None and not self.should_exit:
                self.drain_started = time.monotonic()
                self.service.draining = True
                log.warning("%s: draining; new requests get 503, the %d in flight have up to %g s to finish "
                            "(--drain-timeout); send it again to stop at once", signal.Signals(sig).name,
                            self.gate.in_flight, self.drain_timeout)
                return
            log.warning("%s again: stopping now", signal.Signals(sig).name)
            self.should_exit = self.force_exit = True  # no more waiting for connections

        async def on_tick(self, counter: int) -> bool:
            if self.drain_started is not None and not self.should_exit:
                waited = time.monotonic() - self.drain_started
                if self.gate.in_flight and waited < self.drain_timeout and self.service.engine.batch_window:
                    self.service.engine.flush()  # no companion will come: queued requests start now
                if self.gate.in_flight == 0:
                    log.info("drained: every admitted request is answered; shutting down")
                    self.should_exit = True
                elif waited >= self.drain_timeout:
                    err = ApiError(503, f"the server shut down before this request finished (it waited "
                                        f"{self.drain_timeout:g} s, diffspec serve --drain-timeout)",
                                   "server_error", None, "shutting_down")
                    failed = self.service.engine.abort_all(err)
                    log.warning("--drain-timeout (%g s) reached: %d request(s) still in flight, %d decoding job(s) "
                                "failed with 503; shutting down", self.drain_timeout, self.gate.in_flight, failed)
                    self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer


def _setup_logging() -> None:
    """diffspec's server log (errors, draining) and access log on stderr, beside uvicorn's own lines."""
    logger = logging.getLogger("diffspec.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def serve(settings: ServeSettings) -> None:
    """Load the model and serve until SIGTERM / SIGINT, then drain (what `diffspec serve` runs)."""
    import uvicorn

    app = create_app(settings)
    _setup_logging()
    # uvicorn's access log is off: the gate writes one line per request, with its request id.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=10)
    server = _draining_server_class()(config, app, settings.drain_timeout)
    server.run()
    if not server.started:
        raise OSError(f"the server could not start on {settings.host}:{settings.port} (see the log above)")
