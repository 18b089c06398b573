"""The text of report.md: each section a function of RunResults returning its Markdown lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nfm.pipeline.aggregate import paired, winner
from nfm.pipeline.results import ModelScores, RunResults, Score

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
BASELINES = ("independent", "minibatch-ot", "sd-ot", "sb", "reflow")  # trained without NFM's teacher
OBJECTIVES = {"fm": "flow matching", "meanflow": "MeanFlow", "shortcut": "shortcut"}


def fmt(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def cell(value: float, ci: float | None, digits: int = 2) -> str:
    """mean ± half-width of the 95 % interval over seeds (the mean alone for one seed)."""
    return fmt(value, digits) if ci is None else f"{value:.{digits}f} ± {ci:.{digits}f}"


def fid(row: Score | ModelScores, metric: str = "fid", digits: int = 2) -> str:
    """A row's (or a model's) metric as a cell."""
    return cell(getattr(row, metric), row.ci(metric), digits)


def label(name: str) -> str:
    if name.startswith("nfm[") and name.endswith("]"):
        return f"NFM, {name[4:-1]}"
    coupling, _, objective = name.partition("/")  # a one-step student: nfm/meanflow
    if objective:
        return f"{LABELS.get(coupling, coupling)}, {OBJECTIVES.get(objective, objective)}"
    return LABELS.get(name, name)


def sampler_title(key: str) -> str:
    """A sampler's name for people: euler-4 -> Euler 4, mean-2 -> 2 average-velocity steps, decode+denoise@fitted
    -> decode + denoise, fitted prior."""
    base, fitted = key.removesuffix("@fitted"), key.endswith("@fitted")
    title = base.replace("euler-", "Euler ").replace("+", " + ")
    if base.startswith("mean-"):  # a one-step student's steps of its average velocity
        k = base.removeprefix("mean-")
        title = f"{k} average-velocity step{'' if k == '1' else 's'}"
    return f"{title}, fitted prior" if fitted else title


def _kid(row: Score) -> str:
    """KID as mean ± std (3 significant digits of the spread's scale)."""
    return fmt(row.kid, 3) if row.kid_std is None else f"{row.kid:.3f} ± {row.kid_std:.3f}"


def intro(results: RunResults) -> list[str]:
    seeds = results.seeds
    lines = [
        f"# NFM report — preset `{results.preset}`",
        "",
        f"Samples per evaluation: {results.n} (fixed noise seed {results.seed}, the same for every model), "
        f"against the held-out split ({results.reference} images); features: `{results.extractor}` through "
        "torch-fidelity.",
        "",
    ]
    if results.fid_warning:
        lines += [f"> **Warning.** {results.fid_warning}.", ""]
    fitted = [label(m) for m, p in results.priors.items() if p == "fitted"]
    if fitted:
        lines += [
            f"Sampled from the Gaussian fitted per class to their pair cache's noise (the noise they were trained "
            f"on; `student.sample.prior`): {', '.join(fitted)}. Every other student starts from N(0, I). The "
            "teacher is scored from both.",
            "",
        ]
    ids = results.seed_ids()
    if seeds > 1:
        which = "" if ids == list(range(seeds)) else f"seeds {ids[0]} to {ids[-1]}; "
        lines += [
            f"Every model was trained {seeds} times ({which}training seeds: teacher, pairs and students; seed k "
            "adds 1000 k to each). A cell is the mean ± the half-width of its 95 % interval over the seeds "
            f"(Student's t with n − 1 = {seeds - 1} degrees of freedom); **bold** marks a column's winner only "
            "where its interval lies wholly below every other model's.",
            "",
        ]
    else:
        which = f" (seed {ids[0]}: 1000 × {ids[0]} added to each training seed)" if ids[0] else ""
        lines += [f"One training seed{which}: no intervals, and no winner is marked (`nfm run --seeds 3` gives both).",
                  ""]  # fmt: skip
    if results.merged_from:
        parts = ", ".join(f"`{m['run']}` (seed{'s' if len(m['seeds']) > 1 else ''} {', '.join(map(str, m['seeds']))})"
                          for m in results.merged_from)  # fmt: skip
        lines += [f"Joined by `nfm report merge` from the reports of {parts}.", ""]
    floor = results.floor
    if floor:
        f = floor["fid"]
        lines += [
            f"**Floor.** {floor['n']} held-out images drawn with replacement and scored against the held-out set "
            f"give FID {f['mean']:.2f} ± {f['std']:.2f} (mean ± std over {floor['draws']} draws): what a model that "
            "reproduced the held-out set exactly would score at this sample count. No model can be expected "
            "below it; differences between models smaller than FID's own sampling spread (below) mean nothing.",
            "",
        ]
    if results.data_floor:
        lines += [
            f"(Real *training* images score FID {fmt(results.data_floor['fid'])} against held-out. That is not "
            "a reference line: the feature network was trained on the training split and maps those images "
            "differently from unseen ones, so they can score worse than a model's samples.)",
            "",
        ]
    return lines


def _winners(models: dict[str, ModelScores], cols: list[Any], pick) -> dict[Any, str | None]:
    """Per column: the model whose 95 % interval lies wholly below every other's (None: no such model)."""
    out = {}
    for col in cols:
        cells = {name: (r.fid, r.fid_ci) for name, res in models.items() if (r := pick(res, col)) is not None}
        out[col] = winner(cells)
    return out


def fid_table(results: RunResults, nfes: list[int]) -> list[str]:
    head = "| model | " + " | ".join(f"Euler {k}" for k in nfes) + " | higher order | dopri5 | straightness |"
    lines = ["## FID vs NFE (lower is better)", "", head, "|" + "---|" * (len(nfes) + 4)]
    main = results.main()
    win = _winners(main, nfes, lambda res, k: res.euler().get(k))
    dp_win = _winners(main, ["dopri5"], lambda res, _: res.solver("dopri5"))

    def bold(text: str, name: str, col: Any, table: dict[Any, str | None]) -> str:
        return f"**{text}**" if table.get(col) == name else text

    for name, res in main.items():
        euler, dp = res.euler(), res.solver("dopri5")
        hi = [r for r in res.rows if r.solver not in ("euler", "dopri5")]
        cells = [bold(fid(euler[k]), name, k, win) if k in euler else "–" for k in nfes]
        hi_s = ", ".join(f"{r.solver} NFE {r.nfe}: {fid(r)}" for r in hi) or "–"
        dp_s = f"{bold(fid(dp), name, 'dopri5', dp_win)} (NFE {dp.nfe})" if dp else "–"
        lines.append(
            f"| {label(name)} | " + " | ".join(cells) + f" | {hi_s} | {dp_s} | {fid(res, 'straightness', 4)} |"
        )
    if results.teacher:
        for fitted in (False, True):  # from N(0, I), then from the prior fitted to its pairs (if evaluated)
            rows = [r for r in results.teacher.rows if r.sampler.endswith("@fitted") == fitted]
            if not rows:
                continue
            names = " / ".join(sampler_title(r.sampler.removesuffix("@fitted")) for r in rows)
            lines.append(
                f"| teacher{', fitted prior' if fitted else ''} ({names}) | "
                + " | ".join("" for _ in nfes)
                + f" | {' / '.join(fid(r) for r in rows)} | | |"
            )
    if results.matched:
        m = next(iter(results.matched.values()))
        unit = "FLOPs (counted)" if m["by"] == "flops" else "seconds (measured on this machine)"
        lines += [
            "",
            f"Rows marked *NFM's total compute* train the baseline for {m['steps']} steps instead of "
            f"{m['base_steps']}: the NFM student's steps plus the teacher's training and the pair encoding, in "
            f"{unit} per step of that baseline. The other rows all train {m['base_steps']} steps — the comparison "
            "for a user who already has a teacher.",
        ]
    return lines


def compare(a: Score, b: Score) -> str:
    """How row a stands against row b (lower FID is better), by their 95 % intervals."""
    ca, cb = a.fid_ci, b.fid_ci
    if ca is None or cb is None:
        return "lower mean" if a.fid < b.fid else "higher mean"  # one seed: no verdict
    if a.fid + ca < b.fid - cb:
        return "**better** (intervals separate)"
    if a.fid - ca > b.fid + cb:
        return "**worse** (intervals separate)"
    return "level (intervals overlap)"


def _versus(nfm: ModelScores, base: dict[str, ModelScores], nfes: list[int]) -> list[str]:
    """Rows of the headline table: at each sampler, NFM against the baseline of lowest mean FID."""
    cols = [(f"Euler {k}", nfm.euler().get(k), {n: r.euler().get(k) for n, r in base.items()}) for k in nfes]
    cols.append(("dopri5", nfm.solver("dopri5"), {n: r.solver("dopri5") for n, r in base.items()}))
    lines = ["| sampler | NFM | better baseline | FID ratio NFM / baseline | NFM is |", "|---|---|---|---|---|"]
    for col, row, others in cols:
        others = {n: r for n, r in others.items() if r is not None}
        if row is None or not others:
            continue
        best = min(others, key=lambda n: others[n].fid)
        ratio = row.fid / others[best].fid
        lines.append(
            f"| {col} | {fid(row)} | {fid(others[best])} ({best}) | {ratio:.2f} | {compare(row, others[best])} |"
        )
    return lines


def headline(results: RunResults, nfes: list[int]) -> list[str]:
    """NFM against the better baseline at each NFE (equal student budget; NFM's total compute where the run
    has compute-matched rows) and against its own teacher."""
    main = results.main()
    if "nfm" not in main:
        return []
    base = {k: v for k, v in main.items() if k in BASELINES}
    if not base and not results.teacher:
        return []
    lines = ["## NFM against the better baseline and its teacher" if base else "## NFM against its teacher", ""]
    if base:  # a run of NFM alone has no baseline to name
        lines += [
            "At each sampler, the baseline with the lowest mean FID among "
            f"{', '.join(label(k) for k in base)} (the same student budget as NFM):",
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
    if results.teacher:
        lines += [*([""] if base else []), *_versus_teacher(results, results.teacher.best())]
    return lines + [""]


def paired_clause(a: Score, b: Score, minus: str, below: str = "**lower**", above: str = "**higher**") -> str:
    """Row a against row b paired by training seed (seed k of each from the same data split, teacher and noise):
    '; paired by seed, MINUS = d ± ci: verdict', or '' where the rows do not share two or more seeds."""
    x, y = a.fid_seeds or [], b.fid_seeds or []
    if len(x) < 2 or len(x) != len(y):
        return ""
    d, ci = paired(x, y)
    verdict = below if d + ci < 0 else above if d - ci > 0 else "level"
    return f"; paired by seed, {minus} = {d:+.2f} ± {ci:.2f}".replace("-", "−") + f": {verdict}"


def _paired_verdict(s: Score, t: Score) -> str:
    """Student row s against teacher row t, paired by training seed (seed k's student learnt from seed k's
    teacher)."""
    return paired_clause(s, t, "student - teacher", "**below** its teacher", "**above** its teacher")


def _versus_teacher(results: RunResults, t_best: Score) -> list[str]:
    """The NFM student (and every knob variant trained on the teacher's seeds) at its best sampler against
    its teacher's best sampler: unpaired intervals, and paired by seed where the seeds match."""
    names = ["nfm"] + [k for k in results.knobs if results.students[k].seeds == results.seeds]
    lines = []
    for name in names:
        s_best = results.students[name].best()
        who = "NFM's best sampler" if name == "nfm" else f"`{name[4:-1]}`'s best sampler"
        lines.append(
            f"{who} ({s_best.solver}, NFE {s_best.nfe}: {fid(s_best)}) against its teacher's best "
            f"({t_best.sampler.replace('@fitted', ', fitted prior')}: {fid(t_best)}): {compare(s_best, t_best)}"
            f"{_paired_verdict(s_best, t_best)}."
        )
    return [line for pair in zip(lines, [""] * len(lines), strict=True) for line in pair][:-1]


def knob_table(results: RunResults, nfes: list[int], frontier: Path | None) -> list[str]:
    if not results.knobs:
        return []
    knob_seeds = min((results.students[k].seeds for k in results.knobs if k in results.students), default=0)
    lines = [
        "## The coupling knobs",
        "",
        "NFM students that differ from the default `nfm` row in one setting (same teacher): `eta` scales the noise "
        "added before encoding (× the teacher's η), `views` the pairs per training image, `mix` the fraction of "
        "each batch given fresh independent noise, `steps` the student's training steps; `prior=gaussian` is the "
        "default student itself, sampled from N(0, I) instead of the Gaussian fitted to its pairs' noise. "
        f"Variants trained on {knob_seeds} seed(s) (`knob_seeds`); the default row on "
        f"{results.students['nfm'].seeds if 'nfm' in results.students else 0}.",
        "",
        "| variant | " + " | ".join(f"Euler {k}" for k in nfes) + " | dopri5 | straightness |",
        "|" + "---|" * (len(nfes) + 3),
    ]
    for name in ["nfm", *results.knobs]:
        res = results.students.get(name)
        if res is None:
            continue
        euler, dp = res.euler(), res.solver("dopri5")
        cells = [fid(euler[k]) if k in euler else "–" for k in nfes]
        dp_s = f"{fid(dp)} (NFE {dp.nfe})" if dp else "–"
        name_s = "default (`nfm`)" if name == "nfm" else f"`{results.knob_settings.get(name, name)}`"
        lines.append(f"| {name_s} | " + " | ".join(cells) + f" | {dp_s} | {fid(res, 'straightness', 4)} |")
    if frontier is not None:
        lines += ["", f"![knob frontier]({frontier.name})"]
    return lines + [""]


def spread_table(results: RunResults, nfes: list[int]) -> list[str]:
    spread = results.sampling_spread
    if not spread:
        return []
    some = next(iter(spread.values()))
    lines = [
        "## FID's own sampling noise",
        "",
        f"One trained model (seed {results.seed_ids()[0]}) scored on {len(some['noise_seeds'])} noise seeds "
        f"({results.n} samples each): "
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
        lines.append(f"| {label(name)} | " + " | ".join(cells) + " |")
    return lines + [""]


def one_step_rows(res: ModelScores, objective: str) -> dict[int, Score]:
    """The rows a student of `objective` is meant to be sampled with, by NFE: Euler for flow matching, steps of
    the average velocity for the one-step objectives."""
    return res.euler() if objective == "fm" else res.mean_steps()


def one_step_grid(results: RunResults) -> tuple[list[str], list[str], list[int], dict[tuple[str, str], str]]:
    """The axes of a run of several objectives (table and figure): its objectives, its couplings, the NFE its
    one-step students were swept at, and {(coupling, objective): student name}."""
    grid = results.objectives or {}
    objectives = list(dict.fromkeys(o for _, o in grid.values()))
    couplings = list(dict.fromkeys(c for c, _ in grid.values()))
    nfes = sorted({k for n, (_, o) in grid.items() if o != "fm" for k in one_step_rows(results.students[n], o)})
    return objectives, couplings, nfes, {(c, o): n for n, (c, o) in grid.items()}


def one_step_table(results: RunResults, figure: Path | None = None) -> list[str]:
    """Objective x coupling x NFE: each student at the few steps one-step students are for, and which coupling
    a one-step student wants."""
    grid = results.objectives
    if not grid:
        return []
    objectives, couplings, nfes, names = one_step_grid(results)
    cells = {(n, k): r for n, (_, o) in grid.items() for k, r in one_step_rows(results.students[n], o).items()}
    win = {k: winner({n: (r.fid, r.fid_ci) for (n, kk), r in cells.items() if kk == k}) for k in nfes}
    cols = [(o, k) for o in objectives for k in nfes]
    lines = [
        "## One-step students: objective × coupling",
        "",
        "Every coupling trained with each objective, the same network, steps and batch (a one-step student adds "
        "a step-length embedding to the network's conditioning). Flow matching is sampled with Euler steps; "
        "MeanFlow and shortcut students with steps of the average velocity they learn (NFE = steps). FID; **bold**: "
        "the best of all students at that NFE where its 95 % interval lies below every other's.",
        "",
        "| coupling | " + " | ".join(f"{OBJECTIVES.get(o, o)}, NFE {k}" for o, k in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for c in couplings:
        row = []
        for o, k in cols:
            n = names.get((c, o))
            r = cells.get((n, k))
            row.append("–" if r is None else f"**{fid(r)}**" if win[k] == n else fid(r))
        lines.append(f"| {LABELS.get(c, c)} | " + " | ".join(row) + " |")
    lines.append("")
    for k in nfes:
        at = {n: r for (n, kk), r in cells.items() if kk == k}
        best = min(at, key=lambda n: at[n].fid)
        lines.append(f"- NFE {k}: the lowest mean is {label(best)} ({fid(at[best])}).")
    costs = results.costs or {}
    for o in (o for o in objectives if o != "fm"):  # seed 0's training, as the cost table gives it
        lines += cost_ratio_line(o, [(costs[n], costs[c]) for n, (c, oo) in grid.items() if oo == o and
                                     (costs.get(n) or {}).get("seconds_per_step") and
                                     (costs.get(c) or {}).get("seconds_per_step")])  # fmt: skip
    for n, r in ((n, cells[(n, 1)]) for n, (c, o) in grid.items() if c == "nfm" and o != "fm" and (n, 1) in cells):
        for rival in (("reflow", "fm"), ("reflow", grid[n][1]), ("sd-ot", grid[n][1])):  # one step, paired
            if (m := names.get(rival)) is not None and (m, 1) in cells:
                who, b = label(m) + (", flow matching" if rival[1] == "fm" else ""), cells[(m, 1)]
                lines.append(f"- One step, {label(n)} against {who}: {fid(r)} against {fid(b)}, {compare(r, b)}"
                             f"{paired_clause(r, b, 'NFM - rival')}.")  # fmt: skip
    return lines + ([""] + [f"![one-step students]({figure.name})"] if figure else []) + [""]


def cost_ratio_line(objective: str, pairs: list[tuple[dict, dict]]) -> list[str]:
    """A one-step objective's seconds per step over flow matching's, per coupling (its student, the coupling's
    flow-matching student), median over the couplings whose two students were trained alike: a student reused
    from a run with other threads, or resumed under other conditions, would time the machine, not the objective."""
    if not pairs:
        return []
    alike = [(a, b) for a, b in pairs if a.get("trained_on") == b.get("trained_on") and " then " not in
             (a.get("trained_on") or "")]  # fmt: skip
    what = f"A {OBJECTIVES[objective]} training step"
    if not alike:
        return [f"- {what} is not set against a flow-matching step: no coupling's two students were trained "
                "alike (device, processes, threads: the cost table gives each)."]  # fmt: skip
    ratios = sorted(a["seconds_per_step"] / b["seconds_per_step"] for a, b in alike)
    left = len(pairs) - len(alike)
    where = alike[0][0].get("trained_on")
    return [f"- {what} costs {ratios[len(ratios) // 2]:.2f}× a flow-matching step of the same coupling (median "
            f"over {len(ratios)} couplings, seconds per step as measured in this run"
            + (f", both students on {where}" if where and len({a.get('trained_on') for a, _ in alike}) == 1 else "")
            + (f"; {left} left out, their students trained under different conditions" if left else "")
            + ")."]  # fmt: skip


def guidance_table(results: RunResults) -> list[str]:
    g = results.guidance
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
            cells = [cell(row[k], row.get(f"{k}_ci")) for k in ("unguided", "guided")]
            chosen = ", ".join(f"{w:g}" for w in row["best"])
            lines.append(f"| {label(model)} | {sampler_title(sampler)} | {cells[0]} | {cells[1]} | {chosen} |")
    return lines + [""]


def kid_table(results: RunResults, nfes: list[int]) -> list[str]:
    lines = [
        "",
        "KID at the same points, mean ± standard deviation over torch-fidelity's subsets (in the feature net's "
        "units; a spread as large as the mean means the samples are indistinguishable from held-out at this "
        "sample count):",
        "",
        "| model | " + " | ".join(f"Euler {k}" for k in nfes) + " |",
    ]
    lines.append("|" + "---|" * (len(nfes) + 1))
    for name, res in results.main().items():
        euler = res.euler()
        cells = [_kid(euler[k]) if k in euler else "–" for k in nfes]
        lines.append(f"| {label(name)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Straightness: E_t E |v(x_t, t) − (x_1 − x_0)|² per dimension along "
        f"{results.straightness_steps}-step Euler trajectories (0 = straight paths).",
        "",
    ]
    if results.teacher:
        tb = results.teacher
        bpd = fid(tb, "test_bpd", 4) if tb.test_bpd is not None else "–"
        lines += [f"Teacher: held-out bits/dim {bpd} (noise-augmented, η = {tb.noise_std}).", ""]
    return lines


def likelihood_table(results: RunResults) -> list[str]:
    liks = {name: res.likelihood for name, res in results.students.items() if res.likelihood}
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
            f"| {label(name)} | {fmt(lk['bits_per_dim'], 4)} | {lk['images']} | {lk['divergence']} | {lk['solver']} |"
        )
    if results.teacher and results.teacher.test_bpd is not None:
        lines.append(f"| teacher (exact) | {fmt(results.teacher.test_bpd, 4)} | all | – | – |")
    return lines + [""]


def memorisation_table(results: RunResults) -> list[str]:
    lines = [
        "## Memorisation check",
        "",
        "RMS per-pixel distance of each sample to its nearest training image (Euler, most steps; teacher: denoised):",
        "",
        "| model | mean | min | fraction < 0.05 |",
        "|---|---|---|---|",
    ]
    models = list(results.main().items()) + ([("teacher", results.teacher)] if results.teacher else [])
    for name, res in models:
        m = res.memorisation
        lines.append(
            f"| {label(name)} | {m['nn_dist_mean']:.3f} | {m['nn_dist_min']:.3f} | {m['frac_below_0.05']:.3f} |"
        )
    return lines


def pictures(plot: Path, side_by_side: tuple[str, str] | None, grid_files: dict[tuple[str, str], Path]) -> list[str]:
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


def cost_table(results: RunResults) -> list[str]:
    costs = results.costs
    if not costs:
        return []
    lines = [
        "## What each coupling costs",
        "",
        "Training: seconds per step (same network and batch for every coupling; median over the run), on the "
        "device, processes and threads per process it was measured with (`then` where a resume changed them; – "
        "where the run did not record them): compare seconds only between students trained alike. "
        "Preparation: the seconds spent before the student could train, as measured when it ran (– where that "
        "stage was reused from an earlier run and not timed)"
        + (f" — seed {results.seed_ids()[0]}'s run." if results.seeds > 1 else "."),
        "",
        "| coupling | parameters | s / training step | trained on | training steps | preparation (s) | of which |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in costs.items():
        parts = ", ".join(f"{k} {fmt(v, 1)}" for k, v in c["prep"].items()) or "none"
        sps, params = fmt(c["seconds_per_step"], 4), f"{c['params']:,}" if c.get("params") else "–"
        steps = c.get("steps", results.student_steps if results.student_steps is not None else "–")
        where = c.get("trained_on") or "–"
        lines.append(f"| {label(name)} | {params} | {sps} | {where} | {steps} | {fmt(c.get('prep_seconds'), 1)} "
                     f"| {parts} |")  # fmt: skip
    sd = costs.get("sd-ot", {}).get("sdot_shares")
    if sd:
        lines += [
            "",
            f"Semidiscrete OT assignment (per class): share / mass from {fmt(sd['min_over_mass'])} to "
            f"{fmt(sd['max_over_mass'])}, total variation {sd['tv']:.4f}; an exactly uniform assignment measured "
            f"with the same number of noise draws shows {fmt(sd['floor_min_over_mass'])} to "
            f"{fmt(sd['floor_max_over_mass'])}, TV {sd['floor_tv']:.4f} (sampling noise alone).",
        ]
    return lines + [""]


def exports_table(results: RunResults) -> list[str]:
    """Where each model is (the first seed; report.json lists every seed's): what Student.from_pretrained and
    `nfm student sample` take."""
    if not results.exports:
        return []
    lines = ["## The models", "", f"| model | export (seed {results.seed_ids()[0]}) |", "|---|---|"]
    lines += [f"| {label(name)} | `{paths[0]}` |" for name, paths in results.exports.items() if paths]
    return lines + ["", "`nfm student sample EXPORT`, `nfm.Student.from_pretrained(EXPORT)`.", ""]


def timings(results: RunResults) -> list[str]:
    if not results.timings:
        return []
    lines = ["## Time per stage", "", "| stage | seconds | reused |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {s['seconds']:.1f} | {'yes' if s['reused'] else 'no'} |" for s in results.timings]
    return lines + ["", f"Peak memory (RSS): {results.peak_rss_mb or 0:.0f} MB", ""]


def report_lines(
    results: RunResults,
    plot: Path,
    frontier: Path | None,
    side: tuple[str, str] | None,
    grid_files,
    one_step: Path | None = None,
) -> list[str]:
    """report.md, section by section."""
    nfes = results.euler_nfes()
    lines = intro(results) + headline(results, nfes) + fid_table(results, nfes) + kid_table(results, nfes)
    lines += one_step_table(results, one_step) + guidance_table(results) + spread_table(results, nfes)
    lines += knob_table(results, nfes, frontier) + likelihood_table(results) + cost_table(results)
    lines += memorisation_table(results) + pictures(plot, side, grid_files) + exports_table(results)
    return lines + timings(results)
