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
