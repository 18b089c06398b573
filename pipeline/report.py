"""The NFM-vs-baselines report: report.json, report.md, a FID-vs-NFE plot and sample grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nfm.pipeline.core.images import save_grid
from nfm.pipeline.core.io import atomic_write, write_json

LABELS = {
    "nfm": "NFM (teacher pairs)",
    "independent": "independent (I-CFM)",
    "minibatch-ot": "minibatch OT (OT-CFM)",
    "sd-ot": "semidiscrete OT (SD-FM)",
    "sb": "Schrödinger bridge (SB-CFM)",
    "reflow": "reflow of I-CFM (2-rectified)",
    "nfm-reflow": "reflow of NFM",
}


def _fmt(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def plot_fid_vs_nfe(results: dict[str, Any], path: Path, metric: str = "fid") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for name, res in results["students"].items():
        rows = [r for r in res["rows"] if r["solver"] == "euler"]
        ax.plot(
            [r["nfe"] for r in rows], [r[metric] for r in rows], marker="o", label=f"{LABELS.get(name, name)}, Euler"
        )
        other = [r for r in res["rows"] if r["solver"] != "euler"]
        if other:
            ax.scatter(
                [r["nfe"] for r in other], [r[metric] for r in other], marker="x", color=ax.lines[-1].get_color()
            )
    teacher = results.get("teacher")
    if teacher:
        for r, style in zip(teacher["rows"], (":", "--")):
            ax.axhline(r[metric], color="grey", linestyle=style, label=f"teacher ({r['sampler']})")
    if results.get("data_floor") is not None:
        ax.axhline(results["data_floor"][metric], color="black", linewidth=0.8, label="real train vs held-out")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("NFE (function evaluations; x = heun / dopri5)")
    ax.set_ylabel(f"{metric.upper()} vs held-out ({results['extractor']})")
    ax.set_title(f"{results['preset']}: {metric.upper()} vs NFE (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path


def _kid(row: dict[str, Any]) -> str:
    """KID as mean ± std (3 significant digits of the spread's scale)."""
    std = row.get("kid_std")
    return _fmt(row["kid"], 3) if std is None else f"{row['kid']:.3f} ± {std:.3f}"


def _label(name: str) -> str:
    return LABELS.get(name, name)


def _euler(res: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {r["nfe"]: r for r in res["rows"] if r["solver"] == "euler"}


def _intro(results: dict[str, Any]) -> list[str]:
    return [
        f"# NFM report — preset `{results['preset']}`",
        "",
        f"Samples per evaluation: {results['n']} (fixed noise seed {results['seed']}), against the held-out split "
        f"({results['reference']} images); features: `{results['extractor']}` through torch-fidelity. "
        f"Real training images vs held-out score FID {_fmt(results['data_floor']['fid'])}.",
        "",
    ]


def _fid_table(results: dict[str, Any], nfes: list[int]) -> list[str]:
    head = "| model | " + " | ".join(f"Euler {k}" for k in nfes) + " | higher order | dopri5 | straightness |"
    lines = ["## FID vs NFE (lower is better)", "", head, "|" + "---|" * (len(nfes) + 4)]
    for name, res in results["students"].items():
        euler = _euler(res)
        hi = [r for r in res["rows"] if r["solver"] not in ("euler", "dopri5")]
        dp = [r for r in res["rows"] if r["solver"] == "dopri5"]
        cells = [_fmt(euler[k]["fid"]) if k in euler else "–" for k in nfes]
        hi_s = ", ".join(f"{r['solver']} NFE {r['nfe']}: {_fmt(r['fid'])}" for r in hi) or "–"
        dp_s = f"{_fmt(dp[0]['fid'])} (NFE {dp[0]['nfe']})" if dp else "–"
        lines.append(f"| {_label(name)} | " + " | ".join(cells) + f" | {hi_s} | {dp_s} | {res['straightness']:.4f} |")
    if results.get("teacher"):
        rows = results["teacher"]["rows"]
        lines.append(
            f"| teacher ({' / '.join(r['sampler'] for r in rows)}) | "
            + " | ".join("" for _ in nfes)
            + f" | {' / '.join(_fmt(r['fid']) for r in rows)} | | |"
        )
    return lines


def _kid_table(results: dict[str, Any], nfes: list[int]) -> list[str]:
    lines = [
        "",
        "KID at the same points, mean ± standard deviation over torch-fidelity's subsets (in the feature net's "
        "units; a spread as large as the mean means the samples are indistinguishable from held-out at this "
        "sample count):",
        "",
        "| model | " + " | ".join(f"Euler {k}" for k in nfes) + " |",
    ]
    lines.append("|" + "---|" * (len(nfes) + 1))
    for name, res in results["students"].items():
        euler = _euler(res)
        cells = [_kid(euler[k]) if k in euler else "–" for k in nfes]
        lines.append(f"| {_label(name)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Straightness: E_t E |v(x_t, t) − (x_1 − x_0)|² per dimension along "
        f"{results.get('straightness_steps', 32)}-step Euler trajectories (0 = straight paths).",
        "",
    ]
    if results.get("teacher"):
        tb = results["teacher"]
        eta = tb.get("noise_std")
        lines += [f"Teacher: held-out bits/dim {_fmt(tb.get('test_bpd'), 4)} (noise-augmented, η = {eta}).", ""]
    return lines


def _likelihood_table(results: dict[str, Any]) -> list[str]:
    liks = {name: res["likelihood"] for name, res in results["students"].items() if res.get("likelihood")}
    if not liks:
        return []
    lines = [
        "Students as continuous normalizing flows: bits/dim of held-out x + η·ε through the ODE (`eval.likelihood`):",
        "",
        "| model | bits/dim | images | divergence | solver |",
        "|---|---|---|---|---|",
    ]
    for name, lk in liks.items():
        lines.append(
            f"| {_label(name)} | {_fmt(lk['bits_per_dim'], 4)} | {lk['images']} | {lk['divergence']} | {lk['solver']} |"
        )
    if results.get("teacher") and results["teacher"].get("test_bpd") is not None:
        lines.append(f"| teacher (exact) | {_fmt(results['teacher']['test_bpd'], 4)} | all | – | – |")
    return lines + [""]


def _memorisation_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "## Memorisation check",
        "",
        "RMS per-pixel distance of each sample to its nearest training image (Euler, most steps; teacher: denoised):",
        "",
        "| model | mean | min | fraction < 0.05 |",
        "|---|---|---|---|",
    ]
    models = list(results["students"].items()) + ([("teacher", results["teacher"])] if results.get("teacher") else [])
    for name, res in models:
        m = res["memorisation"]
        lines.append(
            f"| {_label(name)} | {m['nn_dist_mean']:.3f} | {m['nn_dist_min']:.3f} | {m['frac_below_0.05']:.3f} |"
        )
    return lines


def _pictures(plot: Path, grid_files: dict[tuple[str, str], Path]) -> list[str]:
    lines = ["", "## Pictures", "", f"![FID vs NFE]({plot.name})", ""]
    lines += ["Samples from the same noise and labels (column k = class k; students trained from a data source: "
              "(source image, sample) pairs side by side):", ""]  # fmt: skip
    for (model, key), f in grid_files.items():
        lines += [f"**{_label(model)} — {key}**", "", f"![{model} {key}]({f})", ""]
    return lines


def _cost_table(results: dict[str, Any]) -> list[str]:
    costs = results.get("costs")
    if not costs:
        return []
    lines = [
        "## What each coupling costs",
        "",
        "Training: seconds per step (same network, batch and steps for every coupling; median over the run). "
        "Preparation: the seconds spent before the student could train, as measured when it ran (– where that "
        "stage was reused from an earlier run and not timed).",
        "",
        "| coupling | s / training step | preparation (s) | of which |",
        "|---|---|---|---|",
    ]
    for name, c in costs.items():
        parts = ", ".join(f"{k} {_fmt(v, 1)}" for k, v in c["prep"].items()) or "none"
        sps = _fmt(c["seconds_per_step"], 4)
        lines.append(f"| {_label(name)} | {sps} | {_fmt(c.get('prep_seconds'), 1)} | {parts} |")
    sd = costs.get("sd-ot", {}).get("sdot_shares")
    if sd:
        lines += [
            "",
            f"Semidiscrete OT assignment (per class): share / mass from {_fmt(sd['min_over_mass'])} to "
            f"{_fmt(sd['max_over_mass'])}, total variation {sd['tv']:.4f}; an exactly uniform assignment measured "
            f"with the same number of noise draws shows {_fmt(sd['floor_min_over_mass'])} to "
            f"{_fmt(sd['floor_max_over_mass'])}, TV {sd['floor_tv']:.4f} (sampling noise alone).",
        ]
    return lines + [""]


def _timings(results: dict[str, Any]) -> list[str]:
    if not results.get("timings"):
        return []
    lines = ["## Time per stage", "", "| stage | seconds | reused |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {s['seconds']:.1f} | {'yes' if s['reused'] else 'no'} |" for s in results["timings"]]
    return lines + ["", f"Peak memory (RSS): {results.get('peak_rss_mb', 0):.0f} MB", ""]


def write_grids(grids: dict[str, dict[str, torch.Tensor]], out_dir: Path) -> dict[tuple[str, str], Path]:
    """samples/MODEL-KEY.png for every grid (first 100 samples, 10 columns); returns their relative paths."""
    files = {}
    for model, gs in grids.items():
        source = gs.get("source")  # a student from a data source: its grids show (source, sample) pairs
        for key, x in gs.items():
            if key == "source":
                continue
            if source is not None:
                m = min(50, len(x), len(source))
                x = torch.stack([source[:m].to(x), x[:m]], 1).flatten(0, 1)
            f = out_dir / "samples" / f"{model}-{key}.png"
            save_grid(x[:100], f, nrow=10)
            files[(model, key)] = f.relative_to(out_dir)
    return files


def write_report(results: dict[str, Any], grids: dict[str, dict[str, torch.Tensor]], out_dir: Path) -> Path:
    """report.json, report.md, fid_vs_nfe.png and samples/*.png under out_dir; returns report.md."""
    out_dir = Path(out_dir)
    write_json(out_dir / "report.json", results)
    plot = plot_fid_vs_nfe(results, out_dir / "fid_vs_nfe.png")
    grid_files = write_grids(grids, out_dir)
    nfes = sorted({r["nfe"] for res in results["students"].values() for r in res["rows"] if r["solver"] == "euler"})
    lines = _intro(results) + _fid_table(results, nfes) + _kid_table(results, nfes) + _likelihood_table(results)
    lines += _cost_table(results) + _memorisation_table(results) + _pictures(plot, grid_files) + _timings(results)
    report = out_dir / "report.md"
    atomic_write(report, lambda p: p.write_text("\n".join(lines) + "\n"))
    return report
