"""What the LLaDA2 and SDAR tests share: random weights for a tiny checkpoint, the reference RMSNorm
(plain torch, no diffspec code) and the module-scoped checkpoint fixtures."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch


def ref_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded safetensors checkpoint, in fp32, read with safetensors alone (the
    reference side of a parity test must not go through diffspec's loader)."""
    import json

    from safetensors.torch import load_file

    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for f in sorted(set(index.values())):
        state.update(load_file(str(path / f)))
    return {k: v.float() for k, v in state.items()}


def random_state(model: torch.nn.Module, scales: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Weights large enough to route and attend unevenly: norms 1 + 0.3·N(0, 1), `lm_head` N(0, 1), a
    weight whose name ends with a key of `scales` that scale times N(0, 1), matrices N(0, 1/fan_in)."""
    state = {}
    for k, t in model.state_dict().items():
        scale = next((v for suffix, v in (scales or {}).items() if k.endswith(suffix)), None)
        if k.endswith("norm.weight"):
            t = 1 + 0.3 * torch.randn_like(t)
        elif scale is not None:
            t = scale * torch.randn_like(t)
        elif k == "lm_head.weight":
            t = torch.randn_like(t)
        else:
            t = torch.randn_like(t) / math.sqrt(t.shape[-1]) if t.dim() == 2 else torch.randn_like(t)
        state[k] = t.contiguous()
    return state


def ref_rms(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def cli_generate(ckpt: Path, method: str, *flags: str) -> subprocess.CompletedProcess:
    """`diffspec generate --model ckpt --method method --prompt Hello *flags` in a subprocess: it
    succeeds and reports its forwards."""
    r = subprocess.run([sys.executable, "-m", "diffspec", "generate", "--model", str(ckpt), "--method", method,
                        "--prompt", "Hello", *flags], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"[{method}] forwards" in r.stderr
    return r


def checkpoint_fixtures(folder: str, name: str, write: Callable[[Path, dict], Any], config: dict,
                        load: Callable[..., Any]) -> tuple[Any, Any]:
    """Module-scoped fixtures `ckpt` (`write(path, config)` into a temporary folder/name) and `loaded`
    (`load(ckpt, dtype="float32")`); assign them to those names in the test module."""

    @pytest.fixture(scope="module")
    def ckpt(tmp_path_factory) -> Path:
        path = tmp_path_factory.mktemp(folder) / name
        write(path, config)
        return path

    @pytest.fixture(scope="module")
    def loaded(ckpt):
        return load(ckpt, dtype="float32")

    return ckpt, loaded


# Loader peak memory, measured in fresh processes: one writes a sharded bf16 checkpoint, another
# loads it (memory a writer freed would be reused without showing in the RSS growth).
_WRITE = r"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from {module} import {config}, {model}
sys.path.insert(0, "tests")
from test_real_configs import write_tokenizer_json
path = Path(sys.argv[1]); path.mkdir(parents=True)
raw = json.loads(sys.argv[2])
(path / "config.json").write_text(json.dumps(raw))
torch.manual_seed(0)
model = {model}({config}.from_hf_dict(raw))
state = {{k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}}
keys = list(state); weight_map = {{}}
for i in range(4):
    name = f"model-{{i + 1:05d}}-of-00004.safetensors"
    part = {{k: state[k] for k in keys[i::4]}}
    save_file(part, str(path / name)); weight_map.update({{k: name for k in part}})
(path / "model.safetensors.index.json").write_text(json.dumps({{"weight_map": weight_map}}))
write_tokenizer_json(path, {{"<|endoftext|>": 300, "<|mask|>": 301}})
"""
_MEASURE = r"""
import json, sys
from pathlib import Path
from {module} import {loader}
import diffspec.models.dream, diffspec.models.tokenizer  # imported by the loader: their code is no weight
path = Path(sys.argv[1])

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

base = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")
model, _ = {loader}(path, dtype="bfloat16")
peak = status("VmHWM")
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({{"weights_bytes": weights, "ratio": (peak - base) / weights}}))
"""


def loader_peak(tmp_path: Path, raw: dict, module: str, config: str, model: str, loader: str) -> dict:
    """{weights_bytes, ratio}: the loader's peak RSS growth over the bf16 weights' bytes, for a
    4-shard checkpoint of `raw` built by `module.model(module.config.from_hf_dict(raw))`."""
    import json
    import os
    import subprocess
    import sys

    names = dict(module=module, config=config, model=model, loader=loader)
    out = None
    for script, args in ((_WRITE, [json.dumps(raw)]), (_MEASURE, [])):
        out = subprocess.run([sys.executable, "-c", script.format(**names), str(tmp_path / "big"), *args],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             cwd=Path(__file__).resolve().parents[1])
        assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
