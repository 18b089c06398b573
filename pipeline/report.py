"""The NFM-vs-baselines report: report.json, report.md, a FID-vs-NFE plot and sample grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nfm.core.images import grid_image, save_grid
from nfm.core.io import atomic_write, write_json
from nfm.pipeline.aggregate import paired, winner

LABELS = {
    "independent@matched": "independent (I-CFM), NFM's total compute",
    "minibatch-ot@matched": "minibatch OT (OT-CFM), NFM's total compute",
    "sd-ot@matched": "semidiscrete OT (SD-FM), NFM's total compute",
    "sb@matched": "Schrödinger bridge (SB-CFM), NFM's total compute",
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


def _cell(row: dict[str, Any], metric: str = "fid", digits: int = 2) -> str:
    """mean ± half-width of the 95 % interval over seeds (the mean alone for one seed)."""
    ci = row.get(f"{metric}_ci")
    return _fmt(row[metric], digits) if ci is None else f"{row[metric]:.{digits}f} ± {ci:.{digits}f}"


def _main(results: dict[str, Any]) -> dict[str, Any]:
    """The students of the comparison (couplings and compute-matched baselines, not the knob variants)."""
    knobs = set(results.get("knobs", []))
    return {k: v for k, v in results["students"].items() if k not in knobs}


def _many_step(res: dict[str, Any]) -> dict[str, Any]:
    """The row with the most NFE a student was scored at: dopri5 where it ran, else its largest Euler."""
    dp = [r for r in res["rows"] if r["solver"] == "dopri5"]
    return dp[0] if dp else max((r for r in res["rows"] if r["solver"] == "euler"), key=lambda r: r["nfe"])


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


def _errorbar(ax, xs, rows, metric, **kw):
    """Points with their 95 % intervals (none for one seed); returns the line."""
    ys = [r[metric] for r in rows]
    err = [r.get(f"{metric}_ci") or 0.0 for r in rows]
    return ax.errorbar(xs, ys, yerr=err if any(err) else None, capsize=3, **kw)


def _sampler_title(key: str) -> str:
    """A sampler's name for people: euler-4 -> Euler 4, decode+denoise@fitted -> decode + denoise, fitted prior."""
    base, fitted = key.removesuffix("@fitted"), key.endswith("@fitted")
    title = base.replace("euler-", "Euler ").replace("+", " + ")
    return f"{title}, fitted prior" if fitted else title


def plot_fid_vs_nfe(results: dict[str, Any], path: Path, metric: str = "fid") -> Path:
    """FID against NFE for every student of the comparison (Euler lines, higher-order solvers as points),
    the teacher's samplers and the finite-sample floor as horizontal lines; log-log axes, 95 % intervals."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=120)
    markers = {"heun": "s", "dopri5": "x", "midpoint": "^"}
    for name, res in _main(results).items():
        rows = [r for r in res["rows"] if r["solver"] == "euler"]
        line = _errorbar(ax, [r["nfe"] for r in rows], rows, metric, marker="o", label=_label(name))
        color = line.lines[0].get_color()
        for r in (r for r in res["rows"] if r["solver"] != "euler"):
            _errorbar(ax, [r["nfe"]], [r], metric, marker=markers.get(r["solver"], "d"), color=color, ms=7)
    teacher = results.get("teacher")
    if teacher:
        for r in teacher["rows"]:  # decode dotted, decode+denoise dashed; grey from N(0, I), gold from the fitted prior
            base, fitted = r["sampler"].removesuffix("@fitted"), r["sampler"].endswith("@fitted")
            style = "--" if base == "decode+denoise" else ":"
            ax.axhline(r[metric], color="darkgoldenrod" if fitted else "grey", linestyle=style,
                       label=f"teacher ({_sampler_title(r['sampler'])})")  # fmt: skip
    floor = results.get("floor")
    if floor is not None:
        f = floor[metric]
        ax.axhspan(max(f["mean"] - f["std"], 1e-6), f["mean"] + f["std"], color="black", alpha=0.12)
        ax.axhline(f["mean"], color="black", linewidth=0.8, label=f"floor: held-out resampled (n={floor['n']})")
    solvers = sorted({r["solver"] for res in _main(results).values() for r in res["rows"]} - {"euler"})
    handles, labels = ax.get_legend_handles_labels()
    for solver in solvers:
        handles.append(Line2D([], [], color="dimgrey", marker=markers.get(solver, "d"), linestyle="none"))
        labels.append(f"{solver} (marker; colour = model)")
    ax.set_xscale("log", base=2)
    fixed = sorted({r["nfe"] for res in _main(results).values() for r in res["rows"] if r["solver"] != "dopri5"})
    adaptive = sorted(r["nfe"] for res in _main(results).values() for r in res["rows"] if r["solver"] == "dopri5")
    ticks = fixed + ([adaptive[len(adaptive) // 2]] if adaptive else [])
    names = [str(n) for n in fixed] + ([f"dopri5\n{adaptive[0]}–{adaptive[-1]}"] if adaptive else [])
    ax.set_xticks(ticks, names, fontsize=7)
    ax.xaxis.set_minor_locator(matplotlib_null_locator())
    _plain_log_y(ax)
    ax.set_xlabel("NFE (function evaluations)")
    ax.set_ylabel(f"{metric.upper()} vs held-out ({results['extractor']}), log scale")
    seeds = results.get("seeds", 1)
    note = f"mean ± 95 % interval over {seeds} seeds" if seeds > 1 else "one seed"
    ax.set_title(f"{results['preset']}: {metric.upper()} vs NFE (lower is better; {note})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside, not over the data
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_frontier(results: dict[str, Any], path: Path, few: tuple[int, ...] = (1, 2)) -> Path:
    """Few-step FID (Euler 1, Euler 2) against many-step FID for NFM, its knob variants and the baselines:
    the trade-off a knob makes, one panel per few-step NFE."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(few), figsize=(5.2 * len(few), 4.6), dpi=120, squeeze=False)
    knobs = set(results.get("knobs", []))
    # label offsets cycle through four corners in order of x, so that neighbouring points' labels part
    corners = [((4, 3), "left"), ((4, -9), "left"), ((-4, 3), "right"), ((-4, -9), "right")]
    for ax, k in zip(axes[0], few):
        points = []
        for name, res in results["students"].items():
            euler = _euler(res)
            if k not in euler:
                continue
            many = _many_step(res)
            is_knob, is_nfm = name in knobs, name == "nfm"
            style = {"marker": "o" if is_knob else ("*" if is_nfm else "s"), "ms": 11 if is_nfm else 6}
            style["color"] = "tab:blue" if (is_knob or is_nfm) else "tab:grey"
            ax.errorbar(
                many["fid"], euler[k]["fid"], xerr=many.get("fid_ci"), yerr=euler[k].get("fid_ci"),
                linestyle="none", capsize=2, **style,
            )  # fmt: skip
            points.append((many["fid"], euler[k]["fid"], results.get("knob_settings", {}).get(name, name)))
        for i, (x, y, short) in enumerate(sorted(points)):
            offset, ha = corners[i % 4]
            ax.annotate(short, (x, y), fontsize=7, xytext=offset, textcoords="offset points", ha=ha)
        teacher = results.get("teacher")
        if teacher:
            ax.axvline(min(r["fid"] for r in teacher["rows"]), color="grey", linestyle="--", linewidth=0.8)
            ax.text(min(r["fid"] for r in teacher["rows"]), ax.get_ylim()[1], " teacher", fontsize=7, va="top")
        _plain_log_y(ax)
        ax.set_xlabel("many-step FID (dopri5; else the most Euler steps)")
        ax.set_ylabel(f"FID at Euler {k} (log scale)")
        ax.set_title(f"few-step (Euler {k}) vs many-step quality", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(
        f"{results['preset']}: the NFM knobs (blue; star = the default) and the baselines (grey); lower-left is better",
        fontsize=9,
    )
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path


def _kid(row: dict[str, Any]) -> str:
    """KID as mean ± std (3 significant digits of the spread's scale)."""
    std = row.get("kid_std")
    return _fmt(row["kid"], 3) if std is None else f"{row['kid']:.3f} ± {std:.3f}"


def _label(name: str) -> str:
    if name.startswith("nfm[") and name.endswith("]"):
        return f"NFM, {name[4:-1]}"
    return LABELS.get(name, name)


def _euler(res: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {r["nfe"]: r for r in res["rows"] if r["solver"] == "euler"}


def _intro(results: dict[str, Any]) -> list[str]:
    seeds = results.get("seeds", 1)
    lines = [
        f"# NFM report — preset `{results['preset']}`",
        "",
        f"Samples per evaluation: {results['n']} (fixed noise seed {results['seed']}, the same for every model), "
        f"against the held-out split ({results['reference']} images); features: `{results['extractor']}` through "
        "torch-fidelity.",
        "",
    ]
    if results.get("fid_warning"):
        lines += [f"> **Warning.** {results['fid_warning']}.", ""]
    fitted = [_label(m) for m, p in (results.get("priors") or {}).items() if p == "fitted"]
    if fitted:
        lines += [
            f"Sampled from the Gaussian fitted per class to their pair cache's noise (the noise they were trained "
            f"on; `student.sample.prior`): {', '.join(fitted)}. Every other student starts from N(0, I). The "
            "teacher is scored from both.",
            "",
        ]
    if seeds > 1:
        lines += [
            f"Every model was trained {seeds} times (training seeds: teacher, pairs and students; seed k adds 1000 k "
            "to each). A cell is the mean ± the half-width of its 95 % interval over the seeds (Student's t with "
            f"n − 1 = {seeds - 1} degrees of freedom); **bold** marks a column's winner only where its interval lies "
            "wholly below every other model's.",
            "",
        ]
    else:
        lines += ["One training seed: no intervals, and no winner is marked (`nfm run --seeds 3` gives both).", ""]
    floor = results.get("floor")
    if floor:
        f = floor["fid"]
        lines += [
            f"**Floor.** {floor['n']} held-out images drawn with replacement and scored against the held-out set "
            f"give FID {f['mean']:.2f} ± {f['std']:.2f} (mean ± std over {floor['draws']} draws): what a model that "
            "reproduced the held-out set exactly would score at this sample count. No model can be expected "
            "below it; differences between models smaller than FID's own sampling spread (below) mean nothing.",
            "",
        ]
    if results.get("data_floor"):
        lines += [
            f"(Real *training* images score FID {_fmt(results['data_floor']['fid'])} against held-out. That is not "
            "a reference line: the feature network was trained on the training split and maps those images "
            "differently from unseen ones, so they can score worse than a model's samples.)",
            "",
        ]
    return lines


def _winners(rows: dict[str, dict[str, Any]], cols: list[Any], pick) -> dict[Any, str | None]:
    """Per column: the model whose 95 % interval lies wholly below every other's (None: no such model)."""
    out = {}
    for col in cols:
        cells = {name: (r["fid"], r.get("fid_ci")) for name, row in rows.items() if (r := pick(row, col)) is not None}
        out[col] = winner(cells)
    return out


def _fid_table(results: dict[str, Any], nfes: list[int]) -> list[str]:
    head = "| model | " + " | ".join(f"Euler {k}" for k in nfes) + " | higher order | dopri5 | straightness |"
    lines = ["## FID vs NFE (lower is better)", "", head, "|" + "---|" * (len(nfes) + 4)]
    main = _main(results)
    win = _winners(main, nfes, lambda res, k: _euler(res).get(k))
    dp_win = _winners(main, ["dopri5"], lambda res, _: next((r for r in res["rows"] if r["solver"] == "dopri5"), None))

    def bold(text: str, name: str, col: Any, table: dict[Any, str | None]) -> str:
        return f"**{text}**" if table.get(col) == name else text

    for name, res in main.items():
        euler = _euler(res)
        hi = [r for r in res["rows"] if r["solver"] not in ("euler", "dopri5")]
        dp = [r for r in res["rows"] if r["solver"] == "dopri5"]
        cells = [bold(_cell(euler[k]), name, k, win) if k in euler else "–" for k in nfes]
        hi_s = ", ".join(f"{r['solver']} NFE {r['nfe']}: {_cell(r)}" for r in hi) or "–"
        dp_s = f"{bold(_cell(dp[0]), name, 'dopri5', dp_win)} (NFE {dp[0]['nfe']})" if dp else "–"
        st = _cell(res, "straightness", 4)
        lines.append(f"| {_label(name)} | " + " | ".join(cells) + f" | {hi_s} | {dp_s} | {st} |")
    if results.get("teacher"):
        for fitted in (False, True):  # from N(0, I), then from the prior fitted to its pairs (if evaluated)
            rows = [r for r in results["teacher"]["rows"] if r["sampler"].endswith("@fitted") == fitted]
            if not rows:
                continue
            names = " / ".join(_sampler_title(r["sampler"].removesuffix("@fitted")) for r in rows)
            lines.append(
                f"| teacher{', fitted prior' if fitted else ''} ({names}) | "
                + " | ".join("" for _ in nfes)
                + f" | {' / '.join(_cell(r) for r in rows)} | | |"
            )
    matched = results.get("matched")
    if matched:
        m = next(iter(matched.values()))
        unit = "FLOPs (counted)" if m["by"] == "flops" else "seconds (measured on this machine)"
        lines += [
            "",
            f"Rows marked *NFM's total compute* train the baseline for {m['steps']} steps instead of "
            f"{m['base_steps']}: the NFM student's steps plus the teacher's training and the pair encoding, in "
            f"{unit} per step of that baseline. The other rows all train {m['base_steps']} steps — the comparison "
            "for a user who already has a teacher.",
        ]
    return lines


def _compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """How row a stands against row b (lower FID is better), by their 95 % intervals."""
    ca, cb = a.get("fid_ci"), b.get("fid_ci")
    if ca is None or cb is None:
        return "lower mean" if a["fid"] < b["fid"] else "higher mean"  # one seed: no verdict
    if a["fid"] + ca < b["fid"] - cb:
        return "**better** (intervals separate)"
    if a["fid"] - ca > b["fid"] + cb:
        return "**worse** (intervals separate)"
    return "level (intervals overlap)"


BASELINES = ("independent", "minibatch-ot", "sd-ot", "sb", "reflow")  # trained without NFM's teacher


def _versus(nfm: dict[str, Any], base: dict[str, dict[str, Any]], nfes: list[int]) -> list[str]:
    """Rows of the headline table: at each sampler, NFM against the baseline of lowest mean FID."""
    dopri = lambda res: next((r for r in res["rows"] if r["solver"] == "dopri5"), None)  # noqa: E731
    cols = [(f"Euler {k}", _euler(nfm).get(k), {n: _euler(r).get(k) for n, r in base.items()}) for k in nfes]
    cols.append(("dopri5", dopri(nfm), {n: dopri(r) for n, r in base.items()}))
    lines = ["| sampler | NFM | better baseline | FID ratio NFM / baseline | NFM is |", "|---|---|---|---|---|"]
    for col, row, others in cols:
        others = {n: r for n, r in others.items() if r is not None}
        if row is None or not others:
            continue
        best = min(others, key=lambda n: others[n]["fid"])
        ratio = row["fid"] / others[best]["fid"]
        lines.append(
            f"| {col} | {_cell(row)} | {_cell(others[best])} ({best}) | {ratio:.2f} | {_compare(row, others[best])} |"
        )
    return lines


def _headline(results: dict[str, Any], nfes: list[int]) -> list[str]:
    """NFM against the better baseline at each NFE (equal student budget; NFM's total compute where the run
    has compute-matched rows) and against its own teacher."""
    main = _main(results)
    if "nfm" not in main:
        return []
    base = {k: v for k, v in main.items() if k in BASELINES}
    lines = [
        "## NFM against the better baseline and its teacher",
        "",
        "At each sampler, the baseline with the lowest mean FID among "
        f"{', '.join(_label(k) for k in base) or 'none'} (the same student budget as NFM):",
        "",
        *_versus(main["nfm"], base, nfes),
    ]
    matched = {k: v for k, v in main.items() if k.endswith("@matched")}
    if matched:
        lines += [
            "",
            f"Against the baselines trained for NFM's total compute ({', '.join(matched)}):",
            "",
            *_versus(main["nfm"], matched, nfes),
        ]
    teacher = results.get("teacher")
    if teacher:
        t_best = min(teacher["rows"], key=lambda r: r["fid"])
        lines += ["", *_versus_teacher(results, t_best)]
    return lines + [""]


def _paired_verdict(s: dict[str, Any], t: dict[str, Any]) -> str:
    """Student row s against teacher row t, paired by training seed (seed k's student learnt from seed k's
    teacher): the interval of the per-seed differences, or '' without matching seeds."""
    a, b = s.get("fid_seeds") or [], t.get("fid_seeds") or []
    if len(a) < 2 or len(a) != len(b):
        return ""
    d, ci = paired(a, b)
    verdict = "**below** its teacher" if d + ci < 0 else "**above** its teacher" if d - ci > 0 else "level"
    return f"; paired by seed, student − teacher = {d:+.2f} ± {ci:.2f}: {verdict}".replace("-", "−")


def _versus_teacher(results: dict[str, Any], t_best: dict[str, Any]) -> list[str]:
    """The NFM student (and every knob variant trained on the teacher's seeds) at its best sampler against
    its teacher's best sampler: unpaired intervals, and paired by seed where the seeds match."""
    seeds = results.get("seeds", 1)
    names = ["nfm"] + [k for k in (results.get("knobs") or []) if results["students"][k].get("seeds", 1) == seeds]
    lines = []
    for name in names:
        s_best = min(results["students"][name]["rows"], key=lambda r: r["fid"])
        who = "NFM's best sampler" if name == "nfm" else f"`{name[4:-1]}`'s best sampler"
        lines.append(
            f"{who} ({s_best['solver']}, NFE {s_best['nfe']}: {_cell(s_best)}) against its teacher's best "
            f"({t_best['sampler'].replace('@fitted', ', fitted prior')}: {_cell(t_best)}): {_compare(s_best, t_best)}"
            f"{_paired_verdict(s_best, t_best)}."
        )
    return [line for pair in zip(lines, [""] * len(lines), strict=True) for line in pair][:-1]


def _knob_table(results: dict[str, Any], nfes: list[int], frontier: Path | None) -> list[str]:
    knobs = results.get("knobs") or []
    if not knobs:
        return []
    settings = results.get("knob_settings", {})
    lines = [
        "## The coupling knobs",
        "",
        "NFM students that differ from the default `nfm` row in one setting (same teacher): `eta` scales the noise "
        "added before encoding (× the teacher's η), `views` the pairs per training image, `mix` the fraction of "
        "each batch given fresh independent noise, `steps` the student's training steps; `prior=gaussian` is the "
        "default student itself, sampled from N(0, I) instead of the Gaussian fitted to its pairs' noise. "
        f"Variants trained on {_knob_seeds(results)} seed(s) (`knob_seeds`); the default row on "
        f"{results['students']['nfm']['seeds'] if 'nfm' in results['students'] else 0}.",
        "",
        "| variant | " + " | ".join(f"Euler {k}" for k in nfes) + " | dopri5 | straightness |",
        "|" + "---|" * (len(nfes) + 3),
    ]
    for name in ["nfm", *knobs]:
        res = results["students"].get(name)
        if res is None:
            continue
        euler = _euler(res)
        dp = [r for r in res["rows"] if r["solver"] == "dopri5"]
        cells = [_cell(euler[k]) if k in euler else "–" for k in nfes]
        dp_s = f"{_cell(dp[0])} (NFE {dp[0]['nfe']})" if dp else "–"
        label = "default (`nfm`)" if name == "nfm" else f"`{settings.get(name, name)}`"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {dp_s} | {_cell(res, 'straightness', 4)} |")
    if frontier is not None:
        lines += ["", f"![knob frontier]({frontier.name})"]
    return lines + [""]


def _knob_seeds(results: dict[str, Any]) -> int:
    knobs = results.get("knobs") or []
    return min((results["students"][k]["seeds"] for k in knobs if k in results["students"]), default=0)


def _spread_table(results: dict[str, Any], nfes: list[int]) -> list[str]:
    spread = results.get("sampling_spread")
    if not spread:
        return []
    some = next(iter(spread.values()))
    lines = [
        "## FID's own sampling noise",
        "",
        f"One trained model (seed 0) scored on {len(some['noise_seeds'])} noise seeds ({results['n']} samples each): "
        "mean ± standard deviation. This spread is in every cell above; the intervals over training seeds add "
        "the training noise to it.",
        "",
        "| model | " + " | ".join(f"Euler {k}" for k in nfes) + " |",
        "|" + "---|" * (len(nfes) + 1),
    ]
    for name, sp in spread.items():
        cells = [
            f"{sp['euler'][str(k)]['mean']:.2f} ± {sp['euler'][str(k)]['std']:.2f}" if str(k) in sp["euler"] else "–"
            for k in nfes
        ]
        lines.append(f"| {_label(name)} | " + " | ".join(cells) + " |")
    return lines + [""]


def _guidance_table(results: dict[str, Any]) -> list[str]:
    g = results.get("guidance")
    if not g or not g["rows"]:
        return []
    val, test = g["halves"]
    lines = [
        "## Classifier-free guidance",
        "",
        f"Guidance weights {', '.join(f'{w:g}' for w in g['weights'])} tried for every class-conditional model "
        f"(students: v = (1 + w) v(x, t, y) − w v(x, t, ∅) at Euler {', '.join(map(str, g['nfes']))}; the teacher: "
        "its affine parameters guided the same way, decode + denoise). Each model's weight is chosen per sampler "
        f"and training seed on half the held-out split (validation, {val} images, noise seed + 1) and scored on "
        f"the other half (test, {test} images, noise seed + 2) beside the same model unguided. FID against the "
        "test half: compare the rows of this table with each other, not with the tables above (other reference "
        "images).",
        "",
        "| model | sampler | unguided | guided | weight chosen (per seed) |",
        "|---|---|---|---|---|",
    ]
    for model, samplers in g["rows"].items():
        for sampler, row in samplers.items():
            cells = [_cell(row, k) for k in ("unguided", "guided")]
            chosen = ", ".join(f"{w:g}" for w in row["best"])
            lines.append(f"| {_label(model)} | {_sampler_title(sampler)} | {cells[0]} | {cells[1]} | {chosen} |")
    return lines + [""]


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
    for name, res in _main(results).items():
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
        bpd = _cell(tb, "test_bpd", 4) if tb.get("test_bpd") is not None else "–"
        lines += [f"Teacher: held-out bits/dim {bpd} (noise-augmented, η = {eta}).", ""]
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
    models = list(_main(results).items()) + ([("teacher", results["teacher"])] if results.get("teacher") else [])
    for name, res in models:
        m = res["memorisation"]
        lines.append(
            f"| {_label(name)} | {m['nn_dist_mean']:.3f} | {m['nn_dist_min']:.3f} | {m['frac_below_0.05']:.3f} |"
        )
    return lines


def _pictures(plot: Path, side_by_side: tuple[str, str] | None, grid_files: dict[tuple[str, str], Path]) -> list[str]:
    lines = ["", "## Pictures", "", f"![FID vs NFE]({plot.name})", ""]
    if side_by_side:
        name, caption = side_by_side
        lines += [f"![samples side by side]({name})", "", caption, ""]
    if grid_files:
        lines += [
            f"The first 100 samples of each model and sampler, in the order of the fixed inputs, are in `samples/` "
            f"(MODEL-SAMPLER.png; {len(grid_files)} grids in this run).",
            "",
        ]
    return lines


def _cost_table(results: dict[str, Any]) -> list[str]:
    costs = results.get("costs")
    if not costs:
        return []
    lines = [
        "## What each coupling costs",
        "",
        "Training: seconds per step (same network and batch for every coupling; median over the run). "
        "Preparation: the seconds spent before the student could train, as measured when it ran (– where that "
        "stage was reused from an earlier run and not timed)"
        + (" — seed 0's run." if results.get("seeds", 1) > 1 else "."),
        "",
        "| coupling | s / training step | training steps | preparation (s) | of which |",
        "|---|---|---|---|---|",
    ]
    for name, c in costs.items():
        parts = ", ".join(f"{k} {_fmt(v, 1)}" for k, v in c["prep"].items()) or "none"
        sps = _fmt(c["seconds_per_step"], 4)
        steps = c.get("steps", results.get("student_steps", "–"))
        lines.append(f"| {_label(name)} | {sps} | {steps} | {_fmt(c.get('prep_seconds'), 1)} | {parts} |")
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
    euler = [k for k in keys if k.startswith("euler-")]
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


def write_report(
    results: dict[str, Any],
    grids: dict[str, dict[str, torch.Tensor]],
    out_dir: Path,
    grid_files: dict[tuple[str, str], Path] | None = None,
    labels: torch.Tensor | None = None,
) -> Path:
    """report.json, report.md, fid_vs_nfe.png, samples.png (the side-by-side figure) and samples/*.png under
    out_dir; returns report.md. `labels` are the class labels of the grids' samples (None: unconditional).
    `grid_files` names sample grids already written (instead of `grids`; the figure is then kept as it is)."""
    out_dir = Path(out_dir)
    write_json(out_dir / "report.json", results)
    plot = plot_fid_vs_nfe(results, out_dir / "fid_vs_nfe.png")
    frontier = plot_frontier(results, out_dir / "knob_frontier.png") if results.get("knobs") else None
    grid_files = {**(grid_files or {}), **write_grids(grids, out_dir)}
    side = plot_side_by_side(grids, labels, out_dir / "samples.png") if grids else None
    caption_file = out_dir / "samples" / "caption.txt"
    if side:
        atomic_write(caption_file, lambda p, text=side[1]: p.write_text(text + "\n"))
    elif (out_dir / "samples.png").is_file() and caption_file.is_file():
        side = (out_dir / "samples.png", caption_file.read_text().strip())
    side_md = (side[0].name, side[1]) if side else None
    nfes = sorted({r["nfe"] for res in results["students"].values() for r in res["rows"] if r["solver"] == "euler"})
    lines = _intro(results) + _headline(results, nfes) + _fid_table(results, nfes) + _kid_table(results, nfes)
    lines += _guidance_table(results) + _spread_table(results, nfes)
    lines += _knob_table(results, nfes, frontier) + _likelihood_table(results) + _cost_table(results)
    lines += _memorisation_table(results) + _pictures(plot, side_md, grid_files) + _timings(results)
    report = out_dir / "report.md"
    atomic_write(report, lambda p: p.write_text("\n".join(lines) + "\n"))
    return report


def rerender(out_dir: Path) -> Path:
    """Write report.md and the plots of a finished run again from its report.json and samples/ (after a
    change to the report's code): the numbers are read, not recomputed."""
    from nfm.core.io import read_json

    out_dir = Path(out_dir)
    results = read_json(out_dir / "report.json", "run report")
    found = {f.name for f in (out_dir / "samples").glob("*.png")}
    files = {}
    teacher = [f"teacher-{r['sampler']}" for r in (results.get("teacher") or {}).get("rows", [])]
    for model in ["teacher", *results["students"]]:
        keys = [t[len("teacher-") :] for t in teacher] if model == "teacher" else []
        if model != "teacher":
            rows = results["students"][model]["rows"]
            keys = [f"{r['solver']}-{r['nfe']}" for r in rows if r["solver"] == "euler" and r["nfe"] <= 8]
        for key in keys:
            if f"{model}-{key}.png" in found:
                files[(model, key)] = Path("samples") / f"{model}-{key}.png"
    return write_report(results, {}, out_dir, files)


if __name__ == "__main__":  # python -m nfm.pipeline.report RUN_DIR
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m nfm.pipeline.report RUN_DIR   (re-render report.md from report.json)")
    print(rerender(Path(sys.argv[1])))
