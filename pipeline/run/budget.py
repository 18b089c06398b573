"""What the couplings of `nfm run` cost: FLOPs of NFM's preparation (teacher training, pair encoding) and of a
student step, the training steps that give a baseline NFM's total compute (compute_matched), and per coupling
the seconds per step and the preparation seconds measured in the run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from nfm.core.data import ImageDataset
from nfm.core.errors import NFMError
from nfm.core.io import read_json
from nfm.pipeline.run.config import REFLOW_FROM, RunConfig, crossed
from nfm.pipeline.run.context import Costs
from nfm.teacher.protocol import Teacher


def budget_flops(cfg: RunConfig, teacher: Teacher, data: ImageDataset, teacher_trained: bool) -> dict[str, float]:
    """FLOPs of NFM's preparation and of one student step, as torch's FlopCounterMode counts them (matmuls,
    convolutions, attention) on a forward pass; a training step counts 3 forward passes (forward + backward).
    Teacher training: 3 F_t x batch x steps (0 for a teacher that was not trained here); pairs: F_t x rows x
    views (one encode each); a student step: 3 F_s x batch."""
    from torch.utils.flop_counter import FlopCounterMode

    from nfm.student.models import build_student
    from nfm.teacher.protocol import teacher_device

    c, h, _ = data.image_shape
    y = torch.zeros(2, dtype=torch.long) if data.num_classes else None

    def forward_flops(fn) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 2

    device = teacher_device(teacher)
    ty = y.to(device) if (y is not None and teacher.num_classes) else None
    f_t = forward_flops(lambda: teacher.encode(torch.zeros(2, c, h, h, device=device), ty))
    model = build_student(cfg.student.model.resolved(c, h, data.num_classes))
    f_s = forward_flops(lambda: model(torch.zeros(2, c, h, h), torch.full((2,), 0.5), y))
    tt = cfg.teacher.train
    return {
        "teacher_forward": f_t,
        "student_forward": f_s,
        "teacher_training": 3 * f_t * tt.batch_size * tt.steps if teacher_trained else 0.0,
        "pairs": f_t * len(data) * cfg.pairs.views,
        "student_step": 3 * f_s * cfg.student.train.batch_size,
    }


def matched_steps(
    cfg: RunConfig, coupling: str, flops: dict[str, float] | None, students: dict[str, Path], costs: Costs
) -> dict[str, Any]:
    """Training steps that give a baseline NFM's total compute: the student's steps + NFM's preparation
    (teacher + pairs) in units of one step of this baseline, rounded up to a multiple of 100. Decided once
    per seed and kept in the costs file, so a rerun reuses the same student."""
    known = costs.data.get("matched", {}).get(coupling)
    if known and known.get("by") == cfg.matched_by:
        return known
    steps = cfg.student.train.steps
    if cfg.matched_by == "flops":
        prep = flops["teacher_training"] + flops["pairs"]
        extra, detail = prep / flops["student_step"], {"prep_flops": prep, "step_flops": flops["student_step"]}
    else:
        teacher_s = costs.data.get("teacher", {}).get("seconds")
        pairs_s = costs.data.get("nfm pairs", {}).get("seconds")
        sps = seconds_per_step(students[coupling].parent) if coupling in students else None
        if teacher_s is None or pairs_s is None or sps is None:
            raise NFMError(
                "matched_by=seconds needs the teacher's and the pairs' training times measured in this run "
                f"directory (costs.json has teacher {teacher_s}, pairs {pairs_s}); use matched_by=flops"
            )
        extra, detail = (teacher_s + pairs_s) / sps, {"prep_seconds": teacher_s + pairs_s, "step_seconds": sps}
    out = {"by": cfg.matched_by, "steps": steps + 100 * math.ceil(extra / 100), "base_steps": steps, **detail}
    costs.data.setdefault("matched", {})[coupling] = out
    costs.record("matched", None)
    return out


def metric_lines(run: Path) -> list[dict[str, Any]]:
    """A training run's metrics.jsonl, a dict a logged window ([] where it has none)."""
    metrics = run / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []


def seconds_per_step(run: Path) -> float | None:
    """Median seconds per training step of a student run, from its metrics.jsonl (img/s and the batch)."""
    config = run / "config.json"
    if not config.is_file():
        return None
    rates = sorted(r["img_per_s"] for r in metric_lines(run) if r.get("img_per_s"))
    batch = read_json(config, "student config").get("train", {}).get("batch_size")
    return round(batch / rates[len(rates) // 2], 4) if rates and batch else None


def trained_on(run: Path) -> str | None:
    """Where a student run measured its img/s (device, processes, threads per process), from its metrics.jsonl:
    None where not recorded (runs before it was), both conditions where a resume changed them."""
    seen = dict.fromkeys((r["device"], r["processes"], r["threads"]) for r in metric_lines(run) if "threads" in r)
    where = [f"{d}, {p} process{'es' * (p > 1)}, {t} thread{'s' * (t > 1)}" for d, p, t in seen]
    return " then ".join(where) or None


def parameter_count(export: Path) -> int:
    """The parameters of an exported student (a one-step student's step embedding among them)."""
    from nfm.core.io import load_tensors

    return sum(t.numel() for t in load_tensors(export / "model.safetensors", "student weights").values())


def coupling_costs(cfg: RunConfig, students: dict[str, Path], costs: Costs) -> dict[str, Any]:
    """Per coupling: seconds per training step, and the seconds spent preparing the coupling where they were
    measured (teacher training, pair encoding, the OT fit, the reflow source student's training and solves)."""
    prep = {"nfm": ["teacher", "nfm pairs"], "sd-ot": ["sd-ot fit"], "reflow": ["reflow pairs"],
            "nfm-reflow": ["teacher", "nfm pairs", "nfm-reflow pairs"]}  # fmt: skip
    steps = cfg.student.train.steps
    out = {}
    models = {**{name: c for name, (c, _) in crossed(cfg).items()}, **{f"{c}@matched": f"{c}@matched"
              for c in cfg.compute_matched}}  # fmt: skip
    for name, coupling in models.items():  # a one-step student (nfm/meanflow) prepares as its coupling does
        parts: dict[str, float | None] = {p: costs.data.get(p, {}).get("seconds") for p in prep.get(coupling, [])}
        if coupling in REFLOW_FROM:  # the source student's training is part of a reflow coupling's cost
            sps = seconds_per_step(students[REFLOW_FROM[coupling]].parent)
            parts[f"{REFLOW_FROM[coupling]} student"] = None if sps is None else round(sps * steps, 1)
        out[name] = {
            "seconds_per_step": seconds_per_step(students[name].parent),
            "trained_on": trained_on(students[name].parent),
            "params": parameter_count(students[name]),
            "prep": parts,
            "prep_seconds": None if None in parts.values() else round(sum(parts.values()), 1),
        }
        if coupling.startswith("sd-ot") and "sd-ot fit" in costs.data:
            out[name]["prep"] = {"sd-ot fit": costs.data["sd-ot fit"]["seconds"]}
            out[name]["prep_seconds"] = costs.data["sd-ot fit"]["seconds"]
            out[name]["sdot_shares"] = costs.data["sd-ot fit"]["shares"]
        if coupling.endswith("@matched"):
            out[name]["steps"] = costs.data["matched"][coupling.removesuffix("@matched")]["steps"]
    return out
