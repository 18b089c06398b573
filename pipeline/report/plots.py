"""The pictures of report.md: FID against NFE, the knob frontier, the side-by-side sample figure, the sample grids."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from nfm.core.images import grid_image, save_grid
from nfm.core.io import atomic_write
from nfm.pipeline.report.tables import OBJECTIVES, one_step_grid, one_step_rows
from nfm.pipeline.report.tables import label as _label
from nfm.pipeline.report.tables import sampler_title as _sampler_title
from nfm.pipeline.results import RunResults


def matplotlib_null_locator():
    from matplotlib.ticker import NullLocator

    return NullLocator()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_log_y(ax) -> None:
    """A log y axis labelled with plain numbers (6, 10, 20, 40), not 4×10^1."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)


NICE_TICKS = [m * 10.0**e for e in range(-3, 5) for m in (1, 1.5, 2, 3, 4, 5, 6, 8)]


def _log_y_ticks(ax) -> None:
    """A log y axis whose every tick is labelled, at round values spread over the data's range (matplotlib's
    own labels only some minor ticks, and none above 10 on some ranges)."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    ticks = [t for t in NICE_TICKS if lo <= t <= hi]
    while len(ticks) > 9:  # thin them out, keeping the powers of ten
        ticks = [t for i, t in enumerate(ticks) if i % 2 == 0 or math.log10(t).is_integer()]
    ax.set_yticks(ticks)
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylim(lo, hi)


def _part_labels(fig, texts: list, pad: float = 1.0, rounds: int = 60) -> None:
    """Move point labels apart until no two overlap (display coordinates): each overlapping pair is pushed apart
    vertically by the overlap, a few pixels at a time."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for _ in range(rounds):
        boxes = [t.get_window_extent(renderer).expanded(1.0, 1.0 + pad / 10) for t in texts]
        moved = False
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                a, b = boxes[i], boxes[j]
                if a.overlaps(b):
                    dy = (min(a.y1, b.y1) - max(a.y0, b.y0)) / 2 + 0.5
                    up, down = (texts[i], texts[j]) if a.y0 + a.y1 >= b.y0 + b.y1 else (texts[j], texts[i])
                    for t, s in ((up, dy), (down, -dy)):
                        x, y = t.get_position()
                        t.set_position((x, y + s * 72 / fig.dpi))  # offset points
                    moved = True
        if not moved:
            return


def _errorbar(ax, xs, rows, metric, **kw):
    """Points with their 95 % intervals (none for one seed); returns the line."""
    ys = [getattr(r, metric) for r in rows]
    err = [r.ci(metric) or 0.0 for r in rows]
    return ax.errorbar(xs, ys, yerr=err if any(err) else None, capsize=3, **kw)


def plot_fid_vs_nfe(results: RunResults, path: Path, metric: str = "fid") -> Path:
    """FID against NFE for every student of the comparison (Euler lines, higher-order solvers as points),
    the teacher's samplers and the finite-sample floor as horizontal lines; log-log axes, 95 % intervals."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=120)
    markers = {"heun": "s", "dopri5": "x", "midpoint": "^"}
    main = results.main()
    for name, res in main.items():
        rows = [r for r in res.rows if r.solver == "euler"]
        mean = sorted(res.mean_steps().values(), key=lambda r: r.nfe)  # a one-step student: its own sampler
        if mean:  # the line: steps of its average velocity; Euler steps of its velocity (h = 0) dotted
            line = _errorbar(ax, [r.nfe for r in mean], mean, metric, marker="*", ms=9, label=_label(name))
            _errorbar(ax, [r.nfe for r in rows], rows, metric, marker="o", ms=3, linestyle=":", alpha=0.6,
                      color=line.lines[0].get_color())  # fmt: skip
        else:
            line = _errorbar(ax, [r.nfe for r in rows], rows, metric, marker="o", label=_label(name))
        color = line.lines[0].get_color()
        for r in (r for r in res.rows if r.solver not in ("euler", "mean")):
            _errorbar(ax, [r.nfe], [r], metric, marker=markers.get(r.solver, "d"), color=color, ms=7)
    if results.teacher:
        # decode dotted, decode+denoise dashed; grey from N(0, I), gold from the fitted prior
        for r in results.teacher.rows:
            base, fitted = r.sampler.removesuffix("@fitted"), r.sampler.endswith("@fitted")
            style = "--" if base == "decode+denoise" else ":"
            ax.axhline(getattr(r, metric), color="darkgoldenrod" if fitted else "grey", linestyle=style,
                       label=f"teacher ({_sampler_title(r.sampler)})")  # fmt: skip
    floor = results.floor
    if floor is not None:
        f = floor[metric]
        ax.axhspan(max(f["mean"] - f["std"], 1e-6), f["mean"] + f["std"], color="black", alpha=0.12)
        ax.axhline(f["mean"], color="black", linewidth=0.8, label=f"floor: held-out resampled (n={floor['n']})")
    solvers = sorted({r.solver for res in main.values() for r in res.rows} - {"euler", "mean"})
    handles, labels = ax.get_legend_handles_labels()
    if any(res.mean_steps() for res in main.values()):
        handles.append(Line2D([], [], color="dimgrey", marker="*", ms=9))
        labels.append("one-step students: average-velocity steps (dotted: their Euler steps)")
    for solver in solvers:
        handles.append(Line2D([], [], color="dimgrey", marker=markers.get(solver, "d"), linestyle="none"))
        labels.append(f"{solver} (marker; colour = model)")
    ax.set_xscale("log", base=2)
    fixed = sorted({r.nfe for res in main.values() for r in res.rows if r.solver != "dopri5"})
    adaptive = sorted(r.nfe for res in main.values() for r in res.rows if r.solver == "dopri5")
    ticks = fixed + ([adaptive[len(adaptive) // 2]] if adaptive else [])
    names = [str(n) for n in fixed] + ([f"dopri5\n{adaptive[0]}–{adaptive[-1]}"] if adaptive else [])
    ax.set_xticks(ticks, names, fontsize=7)
    ax.xaxis.set_minor_locator(matplotlib_null_locator())
    _plain_log_y(ax)
    ax.set_xlabel("NFE (function evaluations)")
    ax.set_ylabel(f"{metric.upper()} vs held-out ({results.extractor}), log scale")
    seeds = results.seeds
    note = f"mean ± 95 % interval over {seeds} seeds" if seeds > 1 else "one seed"
    ax.set_title(f"{results.preset}: {metric.upper()} vs NFE (lower is better; {note})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside, not over the data
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_frontier(results: RunResults, path: Path, few: tuple[int, ...] = (1, 2)) -> Path:
    """Few-step FID (Euler 1, Euler 2) against many-step FID for NFM, its knob variants and the baselines:
    the trade-off a knob makes, one panel per few-step NFE."""
    fig = frontier_figure(results, few)
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    _pyplot().close(fig)
    return path


def frontier_figure(results: RunResults, few: tuple[int, ...] = (1, 2)):
    """plot_frontier's figure, its point labels parted."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(few), figsize=(5.2 * len(few), 4.6), dpi=120, squeeze=False)
    knobs = set(results.knobs)
    # label offsets cycle through four corners in order of x, so that neighbouring points' labels part
    corners = [((4, 3), "left"), ((4, -9), "left"), ((-4, 3), "right"), ((-4, -9), "right")]
    labels = []
    for ax, k in zip(axes[0], few):
        points = []
        for name, res in results.students.items():
            euler = res.euler()
            if k not in euler:
                continue
            many = res.many_step()
            is_knob, is_nfm = name in knobs, name == "nfm"
            style = {"marker": "o" if is_knob else ("*" if is_nfm else "s"), "ms": 11 if is_nfm else 6}
            style["color"] = "tab:blue" if (is_knob or is_nfm) else "tab:grey"
            ax.errorbar(
                many.fid, euler[k].fid, xerr=many.fid_ci, yerr=euler[k].fid_ci,
                linestyle="none", capsize=2, **style,
            )  # fmt: skip
            points.append((many.fid, euler[k].fid, results.knob_settings.get(name, name)))
        lo, hi = ax.get_xlim()
        for i, (x, y, short) in enumerate(sorted(points)):
            offset, ha = corners[i % 4]
            side = (x - lo) / (hi - lo)  # near an edge, the label goes inwards: it stays inside the axes
            if (side < 0.25 and ha == "right") or (side > 0.75 and ha == "left"):
                offset, ha = (-offset[0], offset[1]), "left" if ha == "right" else "right"
            labels.append(ax.annotate(short, (x, y), fontsize=7, xytext=offset, textcoords="offset points", ha=ha))
        if results.teacher:
            best = results.teacher.best().fid
            ax.axvline(best, color="grey", linestyle="--", linewidth=0.8)
            ax.text(best, ax.get_ylim()[1], " teacher", fontsize=7, va="top")
        _log_y_ticks(ax)
        ax.set_xlabel("many-step FID (dopri5; else the most Euler steps)")
        ax.set_ylabel(f"FID at Euler {k} (log scale)")
        ax.set_title(f"few-step (Euler {k}) vs many-step quality", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(
        f"{results.preset}: the NFM knobs (blue; star = the default) and the baselines (grey); lower-left is better",
        fontsize=9,
    )
    fig.tight_layout()
    for ax in axes[0]:
        _part_labels(fig, [t for t in labels if t.axes is ax])
    return fig


def one_per_class(labels: torch.Tensor | None, n: int, k: int = 10) -> tuple[list[int], list[int] | None]:
    """Indices of the first sample of each of the first k classes among n (with the classes shown), or the
    first k samples of an unconditional model (classes None)."""
    if labels is None:
        return list(range(min(k, n))), None
    first: dict[int, int] = {}
    for i, y in enumerate(labels[:n].tolist()):
        first.setdefault(int(y), i)
    classes = sorted(first)[:k]
    return [first[c] for c in classes], classes


def _panel_keys(model: str, keys: list[str]) -> list[str]:
    if model == "teacher":
        return keys
    mean = [k for k in keys if k.startswith("mean-")]  # a one-step student: its average-velocity steps
    euler = mean or [k for k in keys if k.startswith("euler-")]
    return sorted(euler, key=lambda k: int(k.split("-")[1]))


def plot_side_by_side(
    grids: dict[str, dict[str, torch.Tensor]], labels: torch.Tensor | None, path: Path
) -> tuple[Path, str] | None:
    """One row per model, one panel per sampler (Euler 1, 2, 4, 8 steps; the teacher's decode and
    decode+denoise), every panel the same evaluation inputs: one sample per class, the first of that class
    among the fixed noise and labels. Returns the figure and its caption (from the classes really shown)."""
    models = [m for m, gs in grids.items() if any(k != "source" for k in gs)]
    if not models:
        return None
    n = min(len(x) for m in models for k, x in grids[m].items() if k != "source")
    idx, classes = one_per_class(labels, n)
    rows: list[tuple[str, list[tuple[str, torch.Tensor]]]] = []
    for m in models:
        gs = grids[m]
        if "source" in gs:
            rows.append((f"{_label(m)}: its source", [("source images", gs["source"][idx])]))
        keys = _panel_keys(m, [k for k in gs if k != "source"])
        rows.append((_label(m), [(_sampler_title(k), gs[k][idx]) for k in keys]))
    ncols = max(len(r[1]) for r in rows)
    plt = _pyplot()
    half = (len(idx) + 1) // 2
    size = (2.1 * ncols + 1.6, 1.05 * len(rows) + 0.5)
    fig, axes = plt.subplots(len(rows), ncols, figsize=size, dpi=120, squeeze=False)
    for r, (name, panels) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if c < len(panels):
                title, x = panels[c]
                img = grid_image(x.float().cpu(), nrow=half, pad=1, min_tile=24).permute(1, 2, 0).numpy()
                ax.imshow(img, interpolation="nearest")
                ax.set_title(title, fontsize=7, pad=2)
            if c == 0:
                ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center", labelpad=6)
    fig.tight_layout(pad=0.4, w_pad=1.2, h_pad=0.6)
    atomic_write(path, lambda p: fig.savefig(p, format="png", bbox_inches="tight"))
    plt.close(fig)
    if classes is None:
        what = f"the first {len(idx)} samples"
    elif classes == list(range(len(classes))):
        top = f"{classes[0]}–{classes[half - 1]}"
        what = f"one sample of each class {classes[0]}–{classes[-1]}, classes {top} in the top row"
    else:
        what = f"one sample of each of the classes {', '.join(map(str, classes))}, in that order"
    first = " — the first sample of that class among the fixed inputs" if classes is not None else ""
    caption = f"Every panel shows the same evaluation inputs (noise and labels, fixed for every model): {what}{first}."
    if any("source" in grids[m] for m in models):
        caption += (
            " Students trained from a data source start from held-out source images instead of noise: the row "
            "marked 'its source' shows the (source image, sample) pairs' sources, the same for every such model."
        )
    return path, caption


def plot_one_step(results: RunResults, path: Path) -> Path | None:
    """FID against NFE at the few steps one-step students are for: a panel per objective (flow matching with
    Euler steps, the one-step objectives with their average-velocity steps), a line per coupling in the same
    colour in every panel; a shared log y axis, 95 % intervals."""
    if not results.objectives:
        return None
    plt = _pyplot()
    objectives, couplings, nfes, names = one_step_grid(results)
    fig, axes = plt.subplots(1, len(objectives), figsize=(3.4 * len(objectives) + 1.8, 3.8), dpi=120, sharey=True)
    axes = [axes] if len(objectives) == 1 else list(axes)
    colors = {c: f"C{i}" for i, c in enumerate(couplings)}
    for ax, o in zip(axes, objectives, strict=True):
        for c in couplings:
            rows = one_step_rows(results.students[names[(c, o)]], o) if (c, o) in names else {}
            pts = [rows[k] for k in nfes if k in rows]
            if pts:
                _errorbar(ax, [r.nfe for r in pts], pts, "fid", marker="o", color=colors[c], label=_label(c))
        ax.set_xscale("log", base=2)
        ax.set_xticks(nfes, [str(k) for k in nfes])
        ax.xaxis.set_minor_locator(matplotlib_null_locator())
        ax.set_xlabel("NFE (Euler steps)" if o == "fm" else "NFE (average-velocity steps)")
        ax.set_title(OBJECTIVES.get(o, o), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    _log_y_ticks(axes[0])
    axes[0].set_ylabel(f"FID vs held-out ({results.extractor}), log scale")
    seeds = results.seeds
    note = f"mean ± 95 % interval over {seeds} seeds" if seeds > 1 else "one seed"
    fig.suptitle(f"{results.preset}: which coupling a few-step student wants ({note})", fontsize=10)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", bbox_inches="tight"))
    plt.close(fig)
    return path


def grid_file(model: str, key: str) -> Path:
    """samples/MODEL-KEY.png, a one-step student's MODEL written nfm+meanflow (one file, not a folder)."""
    return Path("samples") / f"{model.replace('/', '+')}-{key}.png"


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
            save_grid(x[:100], out_dir / grid_file(model, key), nrow=10)
            files[(model, key)] = grid_file(model, key)
    return files
