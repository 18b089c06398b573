"""EMA weights and atomic checkpoints: RUN/checkpoints/step-NNNNNNN/

    model.safetensors   the model's state dict
    ema.safetensors     the EMA shadow (float32)
    optimizer.pt        the optimizer's state dict in torch's format, read with torch.load(weights_only=True)
    state.json          {"step": N, "run": RUN_ID, "sha256": {file: digest}}

RUN_ID is the identity of the run that wrote the checkpoint (rundir.run_identity: a hash of its resolved
config, less the settings a resumed run may change): a checkpoint copied into another run is refused there,
even when the architecture matches.

A checkpoint directory is assembled under a temporary name and renamed into place, so a crash leaves
either the previous checkpoint or the new one. Loading is all or nothing: every file is checked against
its sha256, every tensor against the model's names and shapes, and only then is anything copied into the
model, the EMA and the optimizer. Checkpoints written before the checksums (and before optimizer.pt: the
optimizer as optimizer.safetensors + its param groups in state.json) still load.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nfm.core.errors import NFMError
from nfm.core.io import (
    atomic_dir,
    atomic_write,
    load_tensors,
    load_torch_weights,
    read_json,
    save_tensors,
    sha256_file,
    write_json,
)


class EMA:
    """Exponential moving average of a model's floating-point parameters, kept in float32."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """shadow <- shadow + (1 - d) (param - shadow), every tensor in one multi-tensor lerp (one kernel launch
        per device on a GPU; the same arithmetic as a per-tensor lerp_)."""
        d = min(self.decay, (1 + step) / (10 + step))
        names, params = zip(*model.named_parameters(), strict=True)
        torch._foreach_lerp_([self.shadow[k] for k in names], [p.detach().float() for p in params], 1.0 - d)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> nn.Module:
        for k, p in model.named_parameters():
            p.copy_(self.shadow[k].to(p.dtype))
        return model


CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.pt")


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Checkpoint directories a killed write left under their temporary names (.step-N.XXXX.tmp)."""
    d = Path(run_dir) / "checkpoints"
    for tmp in d.glob(".step-*.tmp") if d.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step-"))


def save_checkpoint(
    run_dir: Path, step: int, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer, keep: int, run: str | None = None
) -> Path:
    path = Path(run_dir) / "checkpoints" / f"step-{step:07d}"
    opt_state = opt.state_dict()
    with atomic_dir(path) as tmp:
        save_tensors(tmp / "model.safetensors", model.state_dict())
        save_tensors(tmp / "ema.safetensors", ema.shadow)
        atomic_write(tmp / "optimizer.pt", lambda p: torch.save(opt_state, p))
        digests = {f: sha256_file(tmp / f) for f in CHECKPOINT_FILES}
        write_json(tmp / "state.json", {"step": step, **({"run": run} if run else {}), "sha256": digests})
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
    if not (path / "optimizer.pt").is_file():
        raise NFMError(f"checkpoint {path} has no optimizer.pt; it is incomplete")
    return load_torch_weights(path / "optimizer.pt", "checkpoint optimizer")


def _same_layout(what: str, path: Path, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """The tensors of a checkpoint file have the names and shapes of the live objects."""
    if set(got) != set(want):
        extra, missing = sorted(set(got) - set(want))[:2], sorted(set(want) - set(got))[:2]
        raise NFMError(f"checkpoint {path} {what} belongs to another model (unexpected {extra}, missing {missing})")
    for k, v in got.items():
        if tuple(v.shape) != tuple(want[k].shape):
            shapes = f"{k} is {tuple(v.shape)}, the model's is {tuple(want[k].shape)}"
            raise NFMError(f"checkpoint {path} {what} belongs to another model ({shapes})")


def _check_optimizer(path: Path, sd: dict, opt: torch.optim.Optimizer) -> None:
    live = opt.state_dict()
    sizes = [len(g["params"]) for g in sd.get("param_groups", [])]
    if sizes != [len(g["params"]) for g in live["param_groups"]]:
        raise NFMError(f"checkpoint {path} optimizer has parameter groups of sizes {sizes}: another model's")
    params = [p for g in opt.param_groups for p in g["params"]]
    for pid, st in sd.get("state", {}).items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.ndim and tuple(v.shape) != tuple(params[int(pid)].shape):
                raise NFMError(f"checkpoint {path} optimizer state {k} of parameter {pid} has another shape")


def load_checkpoint(path: Path, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer, run: str | None = None) -> int:
    """Restore (model, EMA, optimizer) from a checkpoint, all or nothing: on any problem an NFMError is raised
    before anything was changed. `run`: the identity of the run resuming; a checkpoint of another run is refused
    (one written before checkpoints carried it loads)."""
    state = read_json(path / "state.json", "checkpoint state")
    if not isinstance(state, dict):
        raise NFMError(f"checkpoint {path} state.json is not a checkpoint state")
    if run and state.get("run") not in (None, run):
        raise NFMError(
            f"checkpoint {path} belongs to another run (run {state['run']}, this run is {run}): it was copied here; "
            "it is not used"
        )
    for name, digest in state.get("sha256", {}).items():
        if name not in CHECKPOINT_FILES or not (path / name).is_file() or sha256_file(path / name) != digest:
            raise NFMError(f"checkpoint {path}: {name} is missing or does not match its checksum (corrupt)")
    weights = load_tensors(path / "model.safetensors", "checkpoint weights")
    _same_layout("weights", path, weights, model.state_dict())
    shadow = load_tensors(path / "ema.safetensors", "checkpoint EMA")
    _same_layout("EMA", path, shadow, ema.shadow)
    opt_state = _optimizer_state(path, state)
    _check_optimizer(path, opt_state, opt)
    if not isinstance(state.get("step"), int) or state["step"] < 0:
        raise NFMError(f"checkpoint {path} state.json has no valid step")
    model.load_state_dict(weights)  # everything checked: now swap it in
    ema.shadow = {k: v.to(ema.shadow[k].device) for k, v in shadow.items()}
    opt.load_state_dict(opt_state)
    return state["step"]
