"""The teacher export: what stage two loads. A directory with

model.safetensors   EMA weights (float32)
config.json         {"kind": "tarflow", "format_version": 1, "model": {...}, "data": {...}, "step": N,
                     "fingerprint": "..."}
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from nfm.core.config import from_dict
from nfm.core.errors import NFMError
from nfm.core.io import export_dir, load_tensors, read_export_config, read_json, write_export
from nfm.teacher.model import TarFlow, TarFlowConfig


def save_export(model: TarFlow, directory: Path, step: int, extra: dict[str, Any] | None = None) -> None:
    sd = {k: v.float() for k, v in model.state_dict().items()}
    config = {"model": asdict(model.cfg), "step": step, "fingerprint": model.fingerprint(), **(extra or {})}
    write_export(directory, sd, "tarflow", config, metadata={"step": str(step)})


def resolve_export_dir(path: str | Path) -> Path:
    """A run directory, its export directory, or the export's config.json -> the export directory."""
    return export_dir(path, "teacher", "nfm teacher train")


def load_teacher(path: str | Path, device: str | torch.device = "cpu") -> TarFlow:
    """Load a teacher export (or the export of a run directory) in eval mode."""
    d, meta = read_export_config(path, "tarflow", "TarFlow teacher", "nfm teacher train")
    cfg = from_dict(TarFlowConfig, meta["model"])
    model = TarFlow(cfg)
    sd = load_tensors(d / "model.safetensors", "teacher weights")
    if "var" not in sd:  # exports written before the prior variance existed: the unit prior
        sd["var"] = model.var.clone()
    missing, unexpected = set(model.state_dict()) - set(sd), set(sd) - set(model.state_dict())
    if missing or unexpected:
        raise NFMError(
            f"teacher weights {d / 'model.safetensors'} do not match its config: missing "
            f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise NFMError(f"teacher weights {d / 'model.safetensors'} do not match its config: {e}") from e
    return model.to(device).eval().requires_grad_(False)


def export_info(path: str | Path) -> dict[str, Any]:
    return read_json(resolve_export_dir(path) / "config.json", "teacher config")
