"""Chat templates: render a checkpoint's own Jinja `chat_template`, as transformers does.

Instruct checkpoints (LLaDA-8B-Instruct, LLaDA-1.5, Dream-v0-Instruct-7B, Qwen3)
ship their prompt format as a Jinja template in `tokenizer_config.json`
(`"chat_template"`: a string, or a list of named templates), or, as transformers
>= 4.43 saves it, in a separate `chat_template.jinja` / `chat_template.json`.
This module renders that template with `jinja2` the way transformers'
`apply_chat_template` does, so a prompt built here is character for character
the one the authors' code builds:

- a sandboxed environment (`ImmutableSandboxedEnvironment`: templates are
  untrusted input) with `trim_blocks` and `lstrip_blocks`, the `loopcontrols`
  extension, and `{% generation %}` blocks rendered as their body;
- `raise_exception(msg)` (raised here as `ChatTemplateError`, a ValueError),
  `strftime_now(fmt)` and a `tojson` filter that does not escape HTML and
  takes `indent` / `separators` / `sort_keys`;
- the context: `messages`, `add_generation_prompt`, `tools`, `documents`, and the
  tokenizer's special-token texts from tokenizer_config.json (`bos_token`,
  `eos_token`, `pad_token`, `unk_token`, `mask_token`, ..., each only when set,
  as transformers' `special_tokens_map`), then any extra keyword arguments.

The rendered text already holds the template's special tokens (BOS included when
the template writes it), so it is encoded with `Tokenizer.encode`, which adds
no special tokens, as `apply_chat_template(tokenize=True)` does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["ChatTemplate", "ChatTemplateError", "apply_chat_template", "load_chat_template", "render_chat_template"]

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """A chat template that is missing, malformed, or refuses the conversation."""


def _import_jinja():
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:  # pragma: no cover - jinja2 comes with transformers and is a dependency
        raise ChatTemplateError("chat templates need jinja2: pip install 'jinja2>=3.1.6'") from None
    return jinja2


@lru_cache(maxsize=32)
def _compile(template: str):
    jinja2 = _import_jinja()

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; render the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message: str):
        raise ChatTemplateError(f"the chat template refused the conversation: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if isinstance(messages, Mapping) or isinstance(messages, str) or not isinstance(messages, Sequence):
        raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise ChatTemplateError(f"message {i} must be a dict with a 'role' (and usually a 'content'), got {m!r}")
        out.append(dict(m))
    return out


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    special_tokens: Mapping[str, str | None] | None = None,
    **kwargs: Any,
) -> str:
    """Render one conversation with `template` exactly as transformers' `apply_chat_template(tokenize=False)`.

    `special_tokens` maps `bos_token` / `eos_token` / ... to their texts (None = unset: the
    template sees it undefined, as in transformers); `kwargs` are extra template variables
    and override the special tokens.
    """
    if not isinstance(template, str) or not template:
        raise ChatTemplateError("the chat template is empty")
    jinja2 = _import_jinja()
    compiled = _compile(template)
    context = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    context.update(kwargs)
    try:
        return compiled.render(messages=_check_messages(messages), tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **context)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed to render: {e}") from None


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(f: Path) -> Any:
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChatTemplateError(f"{f} is not valid JSON ({e})") from None


def _pick(templates: Any, name: str | None, where: Path) -> str | None:
    """A template string from `chat_template` as stored: a string or a list of {name, template}."""
    if templates is None:
        return None
    if isinstance(templates, str):
        if name not in (None, "default"):
            raise ChatTemplateError(f"{where} has a single chat template, not one named {name!r}")
        return templates
    if isinstance(templates, list):
        named = {t.get("name"): t.get("template") for t in templates if isinstance(t, Mapping)}
        key = name or "default"
        if key not in named:
            raise ChatTemplateError(f"{where} has chat templates {sorted(map(str, named))}, none named {key!r}")
        return named[key]
    raise ChatTemplateError(f"{where}: chat_template must be a string or a list of named templates")


def load_chat_template(path: str | Path, name: str | None = None) -> str | None:
    """The chat template of a checkpoint directory, or None when it has none.

    Looks in `chat_template.jinja`, then `chat_template.json`, then `tokenizer_config.json`
    (`name` picks one of several named templates; default "default")."""
    path = Path(path)
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file() and name in (None, "default"):
        return jinja_file.read_text(encoding="utf-8")
    json_file = path / "chat_template.json"
    if json_file.is_file():
        d = _read_json(json_file)
        found = _pick(d.get("chat_template") if isinstance(d, dict) else None, name, json_file)
        if found is not None:
            return found
    cfg_file = path / "tokenizer_config.json"
    if cfg_file.is_file():
        d = _read_json(cfg_file)
        if isinstance(d, dict):
            return _pick(d.get("chat_template"), name, cfg_file)
    return None


def load_special_tokens(path: str | Path) -> dict[str, str]:
    """Special-token texts from tokenizer_config.json (those set), plus `additional_special_tokens`."""
    f = Path(path) / "tokenizer_config.json"
    if not f.is_file():
        return {}
    d = _read_json(f)
    if not isinstance(d, dict):
        return {}
    out: dict[str, Any] = {}
    for key in _SPECIAL_KEYS:
        text = _token_text(d.get(key))
        if text is not None:
            out[key] = text
    extra = d.get("additional_special_tokens")
    if isinstance(extra, list):
        texts = [t for t in (_token_text(x) for x in extra) if t is not None]
        if texts:
            out["additional_special_tokens"] = texts
    return out


@dataclass(frozen=True)
class ChatTemplate:
    """A checkpoint's chat template with the special tokens its tokenizer_config.json names."""

    template: str
    special_tokens: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_pretrained(cls, path: str | Path, name: str | None = None) -> "ChatTemplate":
        template = load_chat_template(path, name)
        if template is None:
            raise ChatTemplateError(f"{path} has no chat template (no chat_template in tokenizer_config.json, "
                                    "chat_template.jinja or chat_template.json); pass the prompt as plain text")
        return cls(template, load_special_tokens(path))

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               **kwargs: Any) -> str:
        return render_chat_template(self.template, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=self.special_tokens, **kwargs)

    def encode(self, tokenizer: Any, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               **kwargs: Any) -> list[int]:
        """Token ids of the rendered conversation (no special tokens added on top of the template's)."""
        return tokenizer.encode(self.render(messages, add_generation_prompt=add_generation_prompt, **kwargs))


def apply_chat_template(
    path: str | Path,
    messages: Sequence[Mapping[str, Any]] | str,
    add_generation_prompt: bool = True,
    **kwargs: Any,
) -> str:
    """Render `messages` (or one user message given as a string) with the template of the checkpoint at `path`."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return ChatTemplate.from_pretrained(path).render(messages, add_generation_prompt=add_generation_prompt, **kwargs)
