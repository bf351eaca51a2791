"""OpenAI request fields -> a validated diffspec job; job events -> OpenAI response and chunk shapes.

Everything a request can get wrong is found here, before it is queued, with the
same code the CLI runs (`evaluate.task_config` -> `api.build_config`), so a bad
request is a 400 of its own and never reaches a batch other requests share.
"""
from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..methods import REGISTRY, get_method
from .errors import bad_request

# The shared decoding options a request may set under "diffspec" (DecodeConfig fields, as the CLI's
# flags); batch_size is the server's (--max-batch), not a request's.
DECODE_KEYS = ("gen_length", "block_length", "steps", "remasking", "temperature", "cfg_scale", "policy", "threshold",
               "factor", "local_threshold", "local_radius", "cache", "refresh_interval", "seed",
               "logits_eos_inf", "confidence_eos_eot_inf")
# Options that name files on the server: a client may not point the server at other paths.
PATH_OPTIONS = ("drafter", "vp_drafter")
MAX_STOPS = 16


def _fallback_qa(messages: list[dict[str, str]]) -> str:
    """The prompt `diffspec generate` builds for the bundled model (`Question: …\\nAnswer:`), with earlier
    turns as solved exemplars (as gsm8k's few-shot prompt joins them) and a system message first."""
    from ..tasks import gsm8k_prompt

    parts: list[str] = []
    system = [m["content"] for m in messages if m["role"] in ("system", "developer")]
    turns = [m for m in messages if m["role"] not in ("system", "developer")]
    if not turns or turns[-1]["role"] != "user":
        raise bad_request("the last message must come from the user (role 'user')", "messages")
    pending: str | None = None
    for m in turns:
        if m["role"] == "user":
            if pending is not None:
                raise bad_request("two user messages in a row; put an assistant message between them",
                                  "messages")
            pending = m["content"]
        elif m["role"] == "assistant":
            if pending is None:
                raise bad_request("an assistant message must answer a user message", "messages")
            parts.append(f"{gsm8k_prompt(pending)} {m['content'].strip()}")
            pending = None
        else:
            raise bad_request(f"unsupported message role {m['role']!r} (use system, user, assistant)", "messages")
    assert pending is not None
    prefix = "\n\n".join(system + parts)
    return (prefix + "\n\n" if prefix else "") + gsm8k_prompt(pending)


def _message_text(content: Any, i: int) -> str:
    """A message's content as text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            out.append(part["text"])
        return "".join(out)
    if content is None:
        return ""
    raise bad_request(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {'role', 'content'} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]")
        out.append({"role": m["role"], "content": _message_text(m.get("content"), i)})
    if not any(m["content"].strip() for m in out if m["role"] == "user"):
        raise bad_request("the conversation has no user text; give some text to answer", "messages", "empty_prompt")
    return out


def _param_of(message: str, names: list[str], top_level: set[str]) -> str | None:
    """The request field an error message speaks of: the option it names first."""
    found = []
    for name in names:
        m = re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", message)
        if m:
            found.append((m.start(), -len(name), name))
    if not found:
        return None
    name = min(found)[2]
    return name if name in top_level else f"diffspec.{name}"


@dataclass
class RequestPlan:
    """What a request asks for, validated: method, config, prompts, n, stops, streaming."""

    method: str
    cfg: Any
    prompts: list[str]
    n: int
    stops: list[str]
    stream: bool
    include_usage: bool
    gen_length: int
    info: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None  # seconds from the request's arrival; then its rows stop and it gets 408


class RequestParser:
    """Turns request bodies into RequestPlans for one served model and its server defaults."""

    def __init__(self, default_method: str, default_options: Mapping[str, Any], family: str, max_batch: int,
                 chat_template: Any = None, limit_n: int | None = None, limit_max_tokens: int | None = None):
        self.default_method, self.default_options = default_method, dict(default_options)
        self.family, self.max_batch, self.chat_template = family, max_batch, chat_template
        self.limit_n, self.limit_max_tokens = limit_n, limit_max_tokens

    # -- decoding options

    def _method(self, ds: Mapping[str, Any]) -> str:
        method = ds.get("method", self.default_method)
        try:
            m = get_method(method)
        except ValueError as e:
            raise bad_request(str(e), "diffspec.method", "unknown_method") from None
        if m.family != self.family:
            from ..api import check_family
            from ..methods import FAMILIES

            try:
                check_family(method, self.family, f"the served model ({FAMILIES[self.family]})")
            except ValueError as e:
                raise bad_request(str(e), "diffspec.method", "wrong_model_family") from None
        return method

    def _request_options(self, method: str, ds: Mapping[str, Any]) -> dict[str, Any]:
        m = get_method(method)
        out: dict[str, Any] = {}
        known = set(DECODE_KEYS) | {k for mm in REGISTRY.values() for k in mm.options}
        for k, v in ds.items():
            if k == "method" or v is None:
                continue
            if k == "batch_size":
                raise bad_request("batch_size is the server's (diffspec serve --max-batch); requests that share "
                                  "settings are batched together", "diffspec.batch_size")
            if k in PATH_OPTIONS and v != self.default_options.get(k):
                raise bad_request(f"{k} names a checkpoint on the server; set it when starting the server "
                                  f"(diffspec serve --{k.replace('_', '-')} DIR)", f"diffspec.{k}")
            if k not in known:
                raise bad_request(f"unknown option {k!r} under 'diffspec'; options are the CLI's decoding flags "
                                  f"with underscores (e.g. gen_length, policy, threshold) and 'method'",
                                  f"diffspec.{k}", "unknown_option")
            opt = m.options.get(k)
            if opt is not None and (isinstance(v, str) or k == "depths") and opt.parse is not str:
                try:
                    v = opt.parse(v)
                except (ValueError, TypeError) as e:
                    raise bad_request(f"{k}: {e}", f"diffspec.{k}", "invalid_option") from None
            out[k] = v
        return out

    def config(self, body: Mapping[str, Any]) -> tuple[str, Any, dict[str, Any]]:
        """(method, config, info) for a request: the server's defaults when it keeps the server's method,
        then its "diffspec" options, then the OpenAI fields, validated by `task_config` as the CLI does."""
        from ..evaluation.evaluate import task_config

        ds = body.get("diffspec") or {}
        if not isinstance(ds, Mapping):
            raise bad_request("'diffspec' must be an object, e.g. {\"method\": \"psd\", \"lossless\": true}",
                              "diffspec")
        method = self._method(ds)
        base = dict(self.default_options) if method == self.default_method else {}
        given = self._request_options(method, ds)
        for name in ("temperature", "seed"):
            v = body.get(name)
            if v is None:
                continue
            if name in given and given[name] != v:
                raise bad_request(f"{name} is given twice with different values ({v!r} and diffspec.{name} "
                                  f"{given[name]!r})", name)
            given[name] = v
        top_p = body.get("top_p")
        if top_p is not None:
            if "top_p" in get_method(method).options:
                given["top_p"] = top_p
            elif top_p != 1:
                raise bad_request(f"top_p is not supported by method {method!r} (only by "
                                  f"{', '.join(n for n, mm in REGISTRY.items() if 'top_p' in mm.options)}); "
                                  "leave it unset or 1", "top_p", "unsupported_parameter")
        opts = {**base, **given}
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens < 1):
            raise bad_request(f"max_tokens must be an integer >= 1, got {max_tokens!r}", "max_tokens")
        names = list(opts) + ["temperature", "seed", "top_p"]
        top_level = {k for k in ("temperature", "seed", "top_p") if body.get(k) is not None}
        try:
            if max_tokens is not None and "gen_length" not in given:
                # the block length, from a config whose steps cannot clash with the old gen_length
                probe = task_config("arith", method, **{k: v for k, v in opts.items() if k != "steps"})
                cfg = task_config("arith", method, **self._with_max_tokens(probe, opts, given, max_tokens))
            else:
                cfg = task_config("arith", method, **opts)
        except ValueError as e:
            raise bad_request(str(e), _param_of(str(e), names, top_level) or "diffspec", "invalid_options") from None
        return method, cfg, {"requested_max_tokens": max_tokens}

    @staticmethod
    def _with_max_tokens(cfg: Any, opts: dict[str, Any], given: Mapping[str, Any], max_tokens: int) -> dict[str, Any]:
        """`opts` with gen_length = max_tokens rounded up to whole blocks (block methods), and a steps
        default from the server scaled to keep its steps per block."""
        decode = getattr(cfg, "decode", cfg)
        block = getattr(decode, "block_length", None) if hasattr(decode, "num_blocks") else None
        gen = math.ceil(max_tokens / block) * block if block else max_tokens
        out = {**opts, "gen_length": gen}
        if "steps" in opts and "steps" not in given:  # the server's steps: keep its rate, not its count
            old_gen, steps = int(cfg.gen_length), int(opts["steps"])
            if block:
                per_block = max(1, steps // max(1, old_gen // block))
                out["steps"] = min(gen, per_block * (gen // block))
            else:
                out["steps"] = max(1, min(gen, round(steps * gen / old_gen)))
        return out

    # -- the other OpenAI fields

    def common(self, body: Mapping[str, Any]) -> tuple[int, list[str], bool, bool]:
        n = body.get("n", 1)
        if n is None:
            n = 1
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise bad_request(f"n must be an integer >= 1, got {n!r}", "n")
        if self.limit_n is not None and n > self.limit_n:
            raise bad_request(f"n={n} is more than this server allows ({self.limit_n}, diffspec serve --limit-n)",
                              "n", "n_too_large")
        stop = body.get("stop")
        if stop is None:
            stops: list[str] = []
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stops = list(stop)
        else:
            raise bad_request("stop must be a string or a list of strings", "stop")
        if len(stops) > MAX_STOPS:
            raise bad_request(f"at most {MAX_STOPS} stop strings, got {len(stops)}", "stop")
        if any(s == "" for s in stops):
            raise bad_request("a stop string is empty", "stop")
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise bad_request("stream must be true or false", "stream")
        so = body.get("stream_options") or {}
        if not isinstance(so, Mapping):
            raise bad_request("stream_options must be an object", "stream_options")
        include_usage = bool(so.get("include_usage", False))
        for name, ok in (("logprobs", lambda v: v in (None, False, 0)), ("top_logprobs", lambda v: v in (None, 0)),
                         ("echo", lambda v: v in (None, False)), ("suffix", lambda v: v in (None, "")),
                         ("logit_bias", lambda v: not v), ("tools", lambda v: not v), ("functions", lambda v: not v),
                         ("best_of", lambda v: v in (None, 1, n)),
                         ("response_format", lambda v: not v or (isinstance(v, Mapping) and v.get("type") == "text"))):
            if not ok(body.get(name)):
                raise bad_request(f"{name} is not supported by diffspec serve", name, "unsupported_parameter")
        return n, stops, stream, include_usage

    def completion_prompts(self, body: Mapping[str, Any]) -> list[str]:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(p, (int, list)) for p in prompt):
            raise bad_request("token-id prompts are not supported; send the prompt as text", "prompt")
        elif prompt is None:
            raise bad_request("prompt is required", "prompt")
        else:
            raise bad_request("prompt must be a string or a non-empty list of strings", "prompt")
        for i, p in enumerate(prompts):
            if not p.strip():
                where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
                raise bad_request(f"{where} is empty; give some text to complete", "prompt", "empty_prompt")
        return prompts

    def chat_prompt(self, body: Mapping[str, Any]) -> str:
        messages = check_messages(body.get("messages"))
        if self.chat_template is None:
            return _fallback_qa(messages)
        try:
            return self.chat_template.render(messages, add_generation_prompt=True)
        except ValueError as e:  # ChatTemplateError: the template refused the conversation
            raise bad_request(str(e), "messages") from None

    def plan(self, body: Any, chat: bool) -> RequestPlan:
        if not isinstance(body, Mapping):
            raise bad_request("the request body must be a JSON object")
        n, stops, stream, include_usage = self.common(body)
        prompts = [self.chat_prompt(body)] if chat else self.completion_prompts(body)
        method, cfg, info = self.config(body)
        gen = int(cfg.gen_length)
        if self.limit_max_tokens is not None and gen > self.limit_max_tokens:
            raise bad_request(f"the request would generate {gen} tokens (its max_tokens, rounded up to whole blocks "
                              "for block methods, or diffspec.gen_length), more than this server allows "
                              f"({self.limit_max_tokens}, diffspec serve --limit-max-tokens); lower max_tokens",
                              "max_tokens", "max_tokens_too_large")
        rows = len(prompts) * n
        if rows > self.max_batch:
            raise bad_request(f"{len(prompts)} prompt(s) × n={n} = {rows} choices is more than the server decodes "
                              f"in one batch ({self.max_batch}, diffspec serve --max-batch)", "n")
        timeout = body.get("timeout")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not math.isfinite(timeout) or timeout <= 0):
            raise bad_request(f"timeout must be a number of seconds > 0, got {timeout!r}", "timeout")
        return RequestPlan(method, cfg, prompts, n, stops, stream, include_usage, int(cfg.gen_length), info,
                           float(timeout) if timeout is not None else None)


# ---------------------------------------------------------------- response shapes


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())
