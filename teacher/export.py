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
from nfm.core.io import load_tensors, read_json, save_tensors, write_json
from nfm.teacher.model import TarFlow, TarFlowConfig

FORMAT_VERSION = 1


def save_export(model: TarFlow, directory: Path, step: int, extra: dict[str, Any] | None = None) -> None:
    directory = Path(directory)
    sd = {k: v.float() for k, v in model.state_dict().items()}
    save_tensors(directory / "model.safetensors", sd, metadata={"format": "nfm-tarflow", "step": str(step)})
    write_json(
        directory / "config.json",
        {
            "kind": "tarflow",
            "format_version": FORMAT_VERSION,
            "model": asdict(model.cfg),
            "step": step,
            "fingerprint": model.fingerprint(),
            **(extra or {}),
        },
    )


def resolve_export_dir(path: str | Path) -> Path:
    """A run directory, its export directory, or the export's config.json -> the export directory."""
    p = Path(path).expanduser()
    if p.is_file() and p.name == "config.json":
        p = p.parent
    if (p / "export" / "config.json").is_file():
        return p / "export"
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return p
    if not p.exists():
        raise NFMError(f"teacher not found: {p} does not exist")
    if (p / "checkpoints").is_dir():
        raise NFMError(
            f"{p} is a teacher run that has not finished (no export yet): rerun its "
            "`nfm teacher train` command to resume and complete it"
        )
    raise NFMError(
        f"{p} is neither a teacher run directory nor a teacher export (expected config.json + model.safetensors)"
    )


def load_teacher(path: str | Path, device: str | torch.device = "cpu") -> TarFlow:
    """Load a teacher export (or the export of a run directory) in eval mode."""
    d = resolve_export_dir(path)
    meta = read_json(d / "config.json", "teacher config")
    if meta.get("kind") != "tarflow":
        raise NFMError(f"{d / 'config.json'} describes a {meta.get('kind')!r}, not a TarFlow teacher export")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise NFMError(f"{d} was written by a newer nfm (format {meta['format_version']}); upgrade nfm")
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
