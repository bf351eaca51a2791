"""diffspec as an lm-evaluation-harness model: `lm_eval --model diffspec --model_args ...`.

Registered as `diffspec` when this module is imported (`python -m diffspec.evaluation.harness` does that, then
runs lm-eval's own CLI). Importing it without lm-eval installed works; building the model then says
how to install it (`pip install -e '.[eval]'`).

model_args (comma-separated `key=value`, lm-eval's syntax):

* `pretrained=DIR`: a checkpoint directory (LLaDA, Dream, or a Llama / Qwen2 / Qwen3 AR target);
  default the bundled model of the method's family (`llada-arith`, or `qwen3-arith` for the AR
  methods).
* `method=NAME`: any method of the registry (default vanilla), and every decoding option of
  `diffspec generate` under its option name: `steps`, `block_length`, `cache`, `policy`,
  `threshold`, `rule`, `num_drafter_steps`, `gamma`, ... (`depths=1;3;5;7`, since commas separate
  model_args). Values are parsed as the CLI parses them; an unknown option, a bad value or an option
  the method does not take is a one-line error.
* `device` (cpu | cuda | cuda:N | auto), `dtype` (float32 | bfloat16 | float16), `batch_size`
  (prompts decoded together; likelihood rows per forward). Given in model_args they win over
  lm-eval's `--device` / `--batch_size`.
* `mc_num` (Monte-Carlo draws for a diffusion model's likelihood, default 128 as LLaDA; one-token
  continuations need one forward whatever it is), `cfg` (LLaDA's likelihood guidance scale,
  default 0), `is_check_greedy` (LLaDA's greedy check for `is_greedy`, default true).
* `cost_out=PATH`: the cost meter's totals for the run (forwards, tokens, FLOPs, wall clock; all
  ranks summed) are written there as JSON after every batch of requests, so accuracy and cost come
  from one run.

generate_until: requests with the same generation settings are decoded together in batches, in
lm-eval's order; `until` stop strings cut the decoded text (a diffusion method decodes whole blocks,
so a stop string may sit inside one); `max_gen_toks` is the generation length (rounded up to whole
blocks for the block-decoding methods, logged) unless `gen_length` is a model_arg, which wins;
`temperature` / `do_sample` from gen_kwargs. Prompts too long for the model keep their end.

loglikelihood: `diffspec.evaluation.likelihood` (exact for AR targets; LLaDA's MC ELBO for diffusion models).
loglikelihood_rolling: AR targets only.

Data parallel: under `torchrun` or `accelerate launch` (RANK / WORLD_SIZE set) the model joins a
torch.distributed group (nccl on CUDA, gloo on CPU), lm-eval shards the documents by rank and
gathers the metrics; `device=cuda` becomes `cuda:LOCAL_RANK`.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

try:  # lm-eval is optional: this module imports without it, the model needs it
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    HAVE_LM_EVAL = True
except ImportError:  # pragma: no cover - exercised only without lm-eval
    LM = object  # type: ignore[assignment,misc]
    HAVE_LM_EVAL = False

    def register_model(*_names: str):  # type: ignore[no-redef]
        return lambda cls: cls


INSTALL_HINT = "lm-eval is not installed; pip install -e '.[eval]' (or pip install lm-eval==0.4.13)"
LM_EVAL_DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF model default when a task gives no max_gen_toks
OWN_ARGS = ("pretrained", "method", "device", "dtype", "batch_size", "max_batch_size", "mc_num", "cfg",
            "cost_out", "is_check_greedy")


class ModelArgsError(ValueError):
    """A bad model_arg (unknown option, bad value, missing checkpoint): one line, no traceback from torch."""


# ---------------------------------------------------------------- model_args -> options


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).strip()


def _field_parser(default: Any):
    """How a DecodeConfig field's text becomes its type (the CLI's argparse types)."""
    from ..options import parse_bool

    if isinstance(default, bool):
        return parse_bool
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    return str


def parse_options(method: str, raw: dict[str, Any]) -> dict[str, Any]:
    """model_args (anything lm-eval's parser produced: str, int, float, bool, None) -> decoding options
    typed as `diffspec generate` types them. Unknown names and unparsable values raise ModelArgsError."""
    from ..decoding.config import DecodeConfig
    from ..methods import get_method, option_owners

    try:
        m = get_method(method)
    except ValueError as e:
        raise ModelArgsError(f"method={method}: {e}") from None
    fields = DecodeConfig.__dataclass_fields__
    owners = option_owners()
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None:
            continue
        if key in fields:
            parse = _field_parser(fields[key].default)
        elif key in owners:
            parse = (m.options[key] if key in m.options else get_method(owners[key][0]).options[key]).parse
        else:
            valid = sorted(set(OWN_ARGS) | set(fields) | set(owners))
            raise ModelArgsError(f"unknown model_arg {key!r} for the diffspec model; valid: {', '.join(valid)}")
        text = _text(value)
        if key == "depths":
            text = text.replace(";", ",")  # commas separate model_args
        try:
            out[key] = parse(text)
        except ValueError as e:
            want = getattr(parse, "__name__", "value")
            detail = f" ({e})" if parse not in (int, float) else ""
            raise ModelArgsError(f"model_arg {key}={text!r} is not a valid {want}{detail}") from None
    return out


def _int_arg(name: str, value: Any, minimum: int = 1) -> int:
    try:
        v = int(_text(value))
    except ValueError:
        raise ModelArgsError(f"model_arg {name}={value!r} must be an integer") from None
    if v < minimum:
        raise ModelArgsError(f"model_arg {name}={v} must be >= {minimum}")
    return v


def block_gen_length(max_gen_toks: int, block_length: int) -> int:
    """`max_gen_toks` rounded up to whole blocks."""
    return max(1, math.ceil(max_gen_toks / block_length)) * block_length


def cut_at_stops(text: str, until: list[str]) -> str:
    """The text before the first occurrence of any stop string (lm-eval's `until`)."""
    cut = len(text)
    for s in until:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


# ---------------------------------------------------------------- the model


@register_model("diffspec")
class DiffspecLM(LM):
    """lm-eval's LM over diffspec's methods, meter and likelihoods (see the module docstring)."""

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "DiffspecLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> "DiffspecLM":
        """model_args win over lm-eval's own flags (`--device` defaults to cuda:0, `--batch_size` to 1),
        instead of clashing with them."""
        args = dict(arg_dict)
        for k, v in (additional_config or {}).items():
            if v is not None and k not in args:
                args[k] = v
                if k == "device":
                    args["_device_from_cli"] = True
        return cls(**args)

    def __init__(self, pretrained: str | None = None, method: str = "vanilla", device: str | None = None,
                 dtype: str | None = None, batch_size: Any = None, max_batch_size: Any = None, mc_num: Any = 128,
                 cfg: Any = 0.0, cost_out: str | None = None, is_check_greedy: Any = True,
                 _device_from_cli: bool = False, **options: Any) -> None:
        if not HAVE_LM_EVAL:
            raise ImportError(INSTALL_HINT)
        super().__init__()
        try:
            self._setup(pretrained, method, device, dtype, batch_size, mc_num, cfg, cost_out, is_check_greedy,
                        _device_from_cli, options)
        except ModelArgsError:
            raise
        except (ValueError, OSError, NotImplementedError) as e:
            raise ModelArgsError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

    def _setup(self, pretrained: str | None, method: str, device: str | None, dtype: str | None, batch_size: Any,
               mc_num: Any, cfg: Any, cost_out: str | None, is_check_greedy: Any, device_from_cli: bool,
               options: dict[str, Any]) -> None:
        from ..api import resolve_model
        from .evaluate import init_distributed, shard_from_env
        from ..jsonio import OutputFile
        from ..methods import get_method
        from ..models.checkpoint import resolve_device, resolve_dtype
        from ..options import parse_bool

        self.method = str(method)
        self.options = parse_options(self.method, options)
        self.family = get_method(self.method).family
        size = "" if batch_size is None else _text(batch_size).lower()
        if size and not size.startswith("auto"):  # lm-eval's `auto`: the method's own default
            self.options["batch_size"] = _int_arg("batch_size", batch_size)
        self.mc_num = _int_arg("mc_num", mc_num)
        try:
            self.cfg = float(_text(cfg))
        except ValueError:
            raise ModelArgsError(f"model_arg cfg={cfg!r} must be a number") from None
        if not self.cfg >= 0 or math.isinf(self.cfg):
            raise ModelArgsError(f"model_arg cfg={cfg!r} must be a finite number >= 0")
        try:
            self.check_greedy = parse_bool(_text(is_check_greedy))
        except ValueError as e:
            raise ModelArgsError(f"model_arg is_check_greedy: {e}") from None
        # Every option checked now, before the model is loaded, on the config of a task that gives no
        # max_gen_toks (each request group sets its own length later).
        self._logged: set[str] = set()
        self._rank = 0
        self.base_config = self._generation_config(None, None, quiet=True)
        self.cost_out = OutputFile.check(cost_out, "cost_out") if cost_out else None

        import torch

        if device is None:
            device = "auto"
        elif str(device).startswith("cuda") and not torch.cuda.is_available() and device_from_cli:
            print(f"diffspec: CUDA is not available; running on cpu instead of lm-eval's default device {device} "
                  "(pass --device cpu to silence this)", file=sys.stderr)
            device = "cpu"
        self.shard = shard_from_env()
        self._rank, self._world_size = self.shard.rank, self.shard.world_size
        try:
            resolved = resolve_device(device)
        except ValueError as e:
            raise ModelArgsError(f"device={device}: {e}") from None
        try:
            resolve_dtype(dtype, resolved)
        except ValueError as e:
            raise ModelArgsError(f"dtype={dtype}: {e}") from None
        device = init_distributed(self.shard, str(device))
        try:
            self.model, self.tokenizer = resolve_model(pretrained, None, device, dtype, method=self.method)
        except (ValueError, OSError) as e:
            raise ModelArgsError(f"pretrained={pretrained or '(bundled)'}: {str(e).splitlines()[0]}") from None
        self._device = next(self.model.parameters()).device
        self.pretrained = pretrained or ("bundled:qwen3-arith" if self.family == "ar" else "bundled:llada-arith")
        self._checkpoint = pretrained
        self._chat: Any = None  # the checkpoint's ChatTemplate, loaded on first use

        from ..decoding.meter import CostMeter

        self.meter = CostMeter()
        self.requests: dict[str, int] = {}
        self.last_config: dict[str, Any] | None = None

    # ---------------------------------------------------------------- chat templates (--apply_chat_template)

    def _template(self) -> Any:
        """The checkpoint's own chat template (`models.chat.ChatTemplate`), loaded once; a checkpoint
        without one is an error naming the fix, never a silent plain-text prompt."""
        if self._chat is None:
            from ..api import checkpoint_dir
            from ..models.chat import ChatTemplate

            path = checkpoint_dir(self._checkpoint, self.method)
            if path is None:
                raise ModelArgsError("--apply_chat_template needs pretrained=DIR (the checkpoint's chat template)")
            self._chat = ChatTemplate.from_pretrained(path)
        return self._chat

    @property
    def tokenizer_name(self) -> str:
        """Fingerprints lm-eval's request cache: the checkpoint and its chat template."""
        return f"diffspec:{self.pretrained}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        return self._template().template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """lm-eval's few-shot chat history rendered with the checkpoint's template, as transformers'
        `apply_chat_template(tokenize=False)` renders it (`models.chat` is tested against it)."""
        return self._template().render(chat_history, add_generation_prompt=add_generation_prompt)

    # ---------------------------------------------------------------- lm-eval's distributed hooks

    @property
    def device(self) -> Any:
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def all_gather(self, tensor: Any) -> Any:
        if self.world_size <= 1:
            return tensor
        import torch
        import torch.distributed as dist

        t = tensor.reshape(-1) if tensor.dim() else tensor.reshape(1)
        out = [torch.zeros_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        return torch.cat(out)

    def gather_object(self, obj: Any, dst: int = 0) -> Any:
        if self.world_size <= 1:
            return [obj]
        import torch.distributed as dist

        result = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    # ---------------------------------------------------------------- helpers

    def _log_once(self, message: str) -> None:
        if message not in self._logged and self.rank == 0:
            self._logged.add(message)
            print(message, file=sys.stderr)

    @property
    def _batch_size(self) -> int:
        from .evaluate import config_value

        return config_value(self.base_config, "batch_size", 32)

    def _generation_config(self, max_gen_toks: int | None, temperature: float | None, quiet: bool = False) -> Any:
        """The method's config for one group of requests: the task's budget (whole blocks for the block
        decoders), the request's temperature, every model_arg option."""
        from ..api import build_config
        from ..decoding.config import DecodeConfig
        from ..methods import get_method

        m = get_method(self.method)
        opts = dict(self.options)
        if "gen_length" in opts or "max_new_tokens" in opts:
            given = opts.get("gen_length", opts.get("max_new_tokens"))
            if max_gen_toks is not None and max_gen_toks != given and not quiet:
                self._log_once(f"diffspec: gen_length={given} from model_args overrides the task's "
                               f"max_gen_toks={max_gen_toks}")
        else:
            want = max_gen_toks if max_gen_toks is not None else LM_EVAL_DEFAULT_MAX_GEN_TOKS
            gen_length = want
            if self.family == "diffusion" and m.takes_block_options:
                block = opts.get("block_length", DecodeConfig.__dataclass_fields__["block_length"].default)
                gen_length = block_gen_length(want, block)
                if gen_length != want and not quiet:
                    self._log_once(f"diffspec: max_gen_toks={want} rounded up to gen_length={gen_length} "
                                   f"({gen_length // block} whole blocks of block_length={block}) for method "
                                   f"{self.method}")
            opts["gen_length"] = gen_length  # (steps: gen_length unless given, `decoding.config.full_steps`)
        if temperature is not None:
            opts["temperature"] = float(temperature)
        return build_config(self.method, **opts)

    def base_config_value(self, name: str, default: Any) -> Any:
        from .evaluate import config_value

        return config_value(self.base_config, name, default)

    def _fit_prompt(self, prompt: str, gen_length: int) -> tuple[str, bool]:
        """The prompt, keeping its end when prompt + generation would not fit the model's positions."""
        from ..decoding.runner import max_positions

        room = max_positions(self.model) - gen_length
        if room < 1:
            raise ModelArgsError(f"gen_length {gen_length} leaves no room for a prompt in the model's "
                                 f"{max_positions(self.model)} positions; lower max_gen_toks / gen_length")
        ids = self.tokenizer.encode(prompt)
        if len(ids) <= room:
            return prompt, False
        return self.tokenizer.decode(ids[-room:]), True

    def _save_cost(self) -> None:
        """Totals over every rank so far, written by rank 0 to `cost_out` (a collective call)."""
        if self.cost_out is None:
            return
        from ..decoding.meter import CostMeter

        mine = {"meter": self.meter, "requests": dict(self.requests)}
        parts = self.gather_object(mine, dst=0)
        if self.rank != 0:
            return
        total = CostMeter(primary=self.meter.primary)
        requests: dict[str, int] = {}
        for p in parts:
            total.merge(p["meter"])
            for k, v in p["requests"].items():
                requests[k] = requests.get(k, 0) + v
        summary = total.summary()
        summary["wall_seconds"] = max(p["meter"].wall_seconds for p in parts)  # ranks run in parallel
        self.cost_out.write_json({
            "model": self.pretrained,
            "method": self.method,
            "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.options.items()},
            "mc_num": self.mc_num,
            "cfg": self.cfg,
            "config": self.last_config,
            "requests": requests,
            "world_size": self.world_size,
            "totals": summary,
            "wall_seconds_per_rank": [p["meter"].wall_seconds for p in parts],
        })

    # ---------------------------------------------------------------- lm-eval's request types

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from ..api import generate

        groups: dict[tuple, list[int]] = {}
        settings: dict[tuple, tuple[list[str], int | None, float | None]] = {}
        for i, req in enumerate(requests):
            _, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen_toks = kw.pop("max_gen_toks", None)
            temperature = kw.pop("temperature", None)
            do_sample = kw.pop("do_sample", None)
            if do_sample is False:
                temperature = 0.0
            elif do_sample and not temperature:
                temperature = float(self.options.get("temperature") or 1.0)
            if kw:
                self._log_once(f"diffspec: ignoring gen_kwargs {sorted(kw)} (diffspec's methods take their "
                               "options as model_args)")
            key = (tuple(until), max_gen_toks, temperature)
            groups.setdefault(key, []).append(i)
            settings[key] = (until, None if max_gen_toks is None else int(max_gen_toks), temperature)
        out: list[str] = [""] * len(requests)
        for key, idx in groups.items():
            until, max_gen_toks, temperature = settings[key]
            cfg = self._generation_config(max_gen_toks, temperature)
            self.last_config = cfg.to_dict()
            gen_length = cfg.gen_length
            fitted = [self._fit_prompt(requests[i].args[0], gen_length) for i in idx]
            cut = sum(t for _, t in fitted)
            if cut:
                self._log_once(f"diffspec: {cut} prompt(s) kept only their last tokens to fit the model's "
                               f"positions with gen_length={gen_length}")
            res = generate([p for p, _ in fitted], model=self.model, tokenizer=self.tokenizer, method=self.method,
                           config=cfg, progress=self.rank == 0 and not disable_tqdm)
            self.meter.merge(res.meter)
            for i, text in zip(idx, res.texts):
                out[i] = cut_at_stops(text, until)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        self.requests["generate_until"] = self.requests.get("generate_until", 0) + len(requests)
        self._save_cost()
        return out

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from tqdm.auto import tqdm

        from .likelihood import encode_pair, loglikelihood

        pairs = [encode_pair(self.tokenizer, ctx, cont) for ctx, cont in (r.args for r in requests)]
        results: list[tuple[float, bool]] = []
        step = max(256, 8 * self._batch_size)  # per-request seeds: chunking changes nothing but the bar
        bar = tqdm(total=len(pairs), desc="diffspec loglikelihood", disable=disable_tqdm or self.rank != 0)
        with self.meter.timed(self.device):
            for s in range(0, len(pairs), step):
                results += loglikelihood(self.model, pairs[s : s + step], batch_size=self._batch_size,
                                         mc_num=self.mc_num, cfg_scale=self.cfg,
                                         seed=self.base_config_value("seed", 0), check_greedy=self.check_greedy,
                                         meter=self.meter)
                bar.update(len(pairs[s : s + step]))
        bar.close()
        for req, r in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, r)
        self.requests["loglikelihood"] = self.requests.get("loglikelihood", 0) + len(requests)
        self._save_cost()
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from ..decoding.capabilities import capabilities
        from .likelihood import ar_loglikelihood_rolling

        if not capabilities(self.model).is_ar:
            raise NotImplementedError(
                "loglikelihood_rolling (perplexity tasks such as wikitext) needs an autoregressive model: a masked "
                "diffusion model has no exact left-to-right likelihood and its ELBO over a whole document is not "
                "comparable; use loglikelihood / generate_until tasks, or an AR target with method ar")
        docs = [self.tokenizer.encode(r.args[0]) for r in requests]
        with self.meter.timed(self.device):
            out = ar_loglikelihood_rolling(self.model, docs, batch_size=self._batch_size, meter=self.meter)
        for req, r in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, r)
        self.requests["loglikelihood_rolling"] = self.requests.get("loglikelihood_rolling", 0) + len(requests)
        self._save_cost()
        return out


def bundled_tasks_dir() -> Path:
    """diffspec's lm-eval task YAMLs (`--include_path`)."""
    return Path(__file__).resolve().parent / "harness_tasks"


LOCAL_DATA = "../shared/data"  # what the packaged gsm8k_local / mmlu_local YAMLs name
LOCAL_TASK_FILES = {"gsm8k_local": ("gsm8k/train.jsonl", "gsm8k/test.jsonl"), "mmlu_local": ("mmlu/test.jsonl",)}


def local_tasks_dir(data_dir: str | Path | None = None, root: str | Path | None = None) -> Path:
    """The task YAMLs with the local data's real place written in: the packaged gsm8k_local and
    mmlu_local name ../shared/data relative to the working directory, which is wrong anywhere but
    the repository root; this copy names `data_dir` (default: `tasks.default_data_dir()`, i.e.
    $DIFFSPEC_DATA or the ../shared/data it finds), absolute. Written under `root` (default the
    diffspec cache), one folder per data directory, rewritten each call so an edited YAML is seen."""
    import hashlib

    from ..models.gguf import cache_root
    from ..tasks import default_data_dir

    data = Path(data_dir if data_dir is not None else default_data_dir()).expanduser().resolve()
    key = hashlib.sha256(str(data).encode("utf-8", "surrogatepass")).hexdigest()[:12]
    out = Path(root if root is not None else cache_root() / "lm_eval_tasks") / key
    out.mkdir(parents=True, exist_ok=True)
    for f in bundled_tasks_dir().iterdir():
        if f.suffix in (".yaml", ".py"):
            (out / f.name).write_text(f.read_text().replace(LOCAL_DATA, str(data)))
    return out


def check_local_data(tasks: str, data_dir: str | Path | None = None) -> None:
    """Name the missing file and the fix before lm-eval fails inside `datasets` with a traceback."""
    from ..tasks import default_data_dir

    data = Path(data_dir if data_dir is not None else default_data_dir())
    for task in tasks.split(","):
        for rel in LOCAL_TASK_FILES.get(task.strip(), ()):
            if not (data / rel).is_file():
                raise ModelArgsError(f"task {task.strip()} reads {data / rel}, which does not exist; set DIFFSPEC_DATA "
                                     "to the folder holding gsm8k/ and mmlu/ (see ../shared/data/README.md)")
