"""The NFM-vs-baselines report: report.json (RunResults), report.md (tables.py), a FID-vs-NFE plot, the knob
frontier and the sample figures (plots.py). `python -m nfm.pipeline.report RUN` writes report.md and the plots of
a finished run again from its report.json — reports written before the typed results render the same."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nfm.core.io import atomic_write, read_json, write_json
from nfm.pipeline.report.plots import (
    grid_file,
    one_per_class,
    plot_fid_vs_nfe,
    plot_frontier,
    plot_one_step,
    plot_side_by_side,
    write_grids,
)
from nfm.pipeline.report.tables import report_lines
from nfm.pipeline.results import RunResults

__all__ = ["grid_files", "one_per_class", "plot_side_by_side", "read_results", "rerender", "write_report"]


def read_results(out_dir: Path) -> RunResults:
    """A run's report.json (any version) as RunResults."""
    return RunResults.from_json(read_json(Path(out_dir) / "report.json", "run report"))


def write_report(
    results: RunResults | dict[str, Any],
    grids: dict[str, dict[str, torch.Tensor]],
    out_dir: Path,
    grid_files: dict[tuple[str, str], Path] | None = None,
    labels: torch.Tensor | None = None,
) -> Path:
    """report.json, report.md, fid_vs_nfe.png, samples.png (the side-by-side figure) and samples/*.png under
    out_dir; returns report.md. `labels` are the class labels of the grids' samples (None: unconditional).
    `grid_files` names sample grids already written (instead of `grids`; the figure is then kept as it is)."""
    out_dir = Path(out_dir)
    if not isinstance(results, RunResults):
        results = RunResults.from_json(results)
    write_json(out_dir / "report.json", results.to_json())
    plot = plot_fid_vs_nfe(results, out_dir / "fid_vs_nfe.png")
    frontier = plot_frontier(results, out_dir / "knob_frontier.png") if results.knobs else None
    one_step = plot_one_step(results, out_dir / "one_step.png")
    grid_files = {**(grid_files or {}), **write_grids(grids, out_dir)}
    side = plot_side_by_side(grids, labels, out_dir / "samples.png") if grids else None
    caption_file = out_dir / "samples" / "caption.txt"
    if side:
        atomic_write(caption_file, lambda p, text=side[1]: p.write_text(text + "\n"))
    elif (out_dir / "samples.png").is_file() and caption_file.is_file():
        side = (out_dir / "samples.png", caption_file.read_text().strip())
    side_md = (side[0].name, side[1]) if side else None
    lines = report_lines(results, plot, frontier, side_md, grid_files, one_step)
    report = out_dir / "report.md"
    atomic_write(report, lambda p: p.write_text("\n".join(lines) + "\n"))
    return report


def grid_files(results: RunResults, out_dir: Path) -> dict[tuple[str, str], Path]:
    """The sample grids of `results`' models that out_dir/samples/ holds, by (model, sampler)."""
    files = {}
    teacher = [f"teacher-{r.sampler}" for r in (results.teacher.rows if results.teacher else [])]
    for model in ["teacher", *results.students]:
        keys = [t[len("teacher-") :] for t in teacher] if model == "teacher" else []
        if model != "teacher":
            rows = results.students[model].rows
            keys = [f"{r.solver}-{r.nfe}" for r in rows if r.solver in ("euler", "mean") and r.nfe <= 8]
        for key in keys:
            if (out_dir / grid_file(model, key)).is_file():
                files[(model, key)] = grid_file(model, key)
    return files


def rerender(out_dir: Path) -> Path:
    """Write report.md and the plots of a finished run again from its report.json and samples/ (after a
    change to the report's code): the numbers are read, not recomputed."""
    out_dir = Path(out_dir)
    results = read_results(out_dir)
    return write_report(results, {}, out_dir, grid_files(results, out_dir))
