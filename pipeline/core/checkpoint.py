"""EMA weights and atomic checkpoints: RUN/checkpoints/step-NNNNNNN/

    model.safetensors   the model's state dict
    ema.safetensors     the EMA shadow (float32)
    optimizer.pt        the optimizer's state dict in torch's format, read with torch.load(weights_only=True)
    state.json          {"step": N}

A checkpoint directory is assembled under a temporary name and renamed into place, so a crash leaves
either the previous checkpoint or the new one. Checkpoints written before optimizer.pt existed (the
optimizer as optimizer.safetensors + its param groups in state.json) still load.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nfm.pipeline.core.errors import NFMError
from nfm.pipeline.core.io import atomic_dir, atomic_write, load_tensors, read_json, save_tensors, write_json


class EMA:
    """Exponential moving average of a model's floating-point parameters, kept in float32."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, p in model.named_parameters():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - d)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> nn.Module:
        for k, p in model.named_parameters():
            p.copy_(self.shadow[k].to(p.dtype))
        return model


def list_checkpoints(run_dir: Path) -> list[Path]:
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step-"))


def save_checkpoint(
    run_dir: Path, step: int, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer, keep: int
) -> Path:
    path = Path(run_dir) / "checkpoints" / f"step-{step:07d}"
    opt_state = opt.state_dict()
    with atomic_dir(path) as tmp:
        save_tensors(tmp / "model.safetensors", model.state_dict())
        save_tensors(tmp / "ema.safetensors", ema.shadow)
        atomic_write(tmp / "optimizer.pt", lambda p: torch.save(opt_state, p))
        write_json(tmp / "state.json", {"step": step})
    for old in list_checkpoints(run_dir)[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _legacy_optimizer_state(path: Path, meta: dict) -> dict:
    """The optimizer of a checkpoint written as optimizer.safetensors (tensors) + state.json (the rest)."""
    state: dict[int, dict[str, Any]] = {}
    for key, v in load_tensors(path / "optimizer.safetensors", "checkpoint optimizer").items():
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta.get("extra", {}).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    # JSON made the groups' tuples (AdamW's betas) lists; give them back as torch wrote them
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
        for g in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def _optimizer_state(path: Path, state: dict) -> dict:
    if not (path / "optimizer.pt").is_file() and "optimizer" in state:
        return _legacy_optimizer_state(path, state["optimizer"])
    try:
        return torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise NFMError(f"checkpoint {path} has no optimizer.pt; it is incomplete") from e
    except Exception as e:  # truncated / corrupt / not a state dict
        raise NFMError(f"checkpoint optimizer {path / 'optimizer.pt'} cannot be read ({e}); it is corrupt") from e


def load_checkpoint(path: Path, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer) -> int:
    state = read_json(path / "state.json", "checkpoint state")
    model.load_state_dict(load_tensors(path / "model.safetensors", "checkpoint weights"))
    shadow = load_tensors(path / "ema.safetensors", "checkpoint EMA")
    if set(shadow) != set(ema.shadow):
        raise NFMError(f"checkpoint {path} EMA does not match the model; it belongs to another model")
    ema.shadow = {k: v.to(ema.shadow[k].device) for k, v in shadow.items()}
    opt.load_state_dict(_optimizer_state(path, state))
    return int(state["step"])
