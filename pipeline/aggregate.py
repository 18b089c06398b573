"""Results over several training seeds: means with 95 % intervals, and which model wins a column.

An interval is Student's t over the seeds, mean ± t_{0.975, n-1} · s / √n (s: the sample standard
deviation); with one seed there is none. A model wins a column only where its whole interval lies
below every other model's interval: a better mean inside overlapping intervals is not a win.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from nfm.pipeline.results import ModelScores, Score


def interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float | None]:
    """(mean, half-width of the `level` t-interval); half-width None for fewer than two values."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    from scipy.stats import t

    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n))


def spread(values: Sequence[float]) -> dict[str, Any]:
    """mean, sample standard deviation, min and max of repeated measurements of one quantity."""
    n = len(values)
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": sd, "min": min(values), "max": max(values), "values": list(values)}


def _mean_dict(dicts: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: math.fsum(d[k] for d in dicts) / len(dicts) for k in dicts[0]}


def _rows(per_seed: Sequence[list[dict[str, Any]]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Row i over the seeds: fid / kid as means, with the interval and the per-seed values."""
    out = []
    for rows in zip(*per_seed, strict=True):
        names = {tuple(r.get(k) for k in keys) for r in rows}
        if len(names) != 1:
            raise ValueError(f"the seeds' sweeps disagree on their rows: {sorted(map(str, names))}")
        row = dict(rows[0])
        for metric in ("fid", "kid"):
            values = [r[metric] for r in rows]
            row[metric], row[f"{metric}_ci"] = interval(values)
            row[f"{metric}_seeds"] = values
        row["kid_std"] = math.fsum(r["kid_std"] for r in rows) / len(rows)
        if "nfe" in row:  # adaptive solvers take a different number of steps per model
            nfes = [r["nfe"] for r in rows]
            row["nfe"] = round(math.fsum(nfes) / len(nfes))
            if len(set(nfes)) > 1:
                row["nfe_seeds"] = nfes
        out.append(row)
    return out


def aggregate_student(per_seed: Sequence[dict[str, Any]]) -> ModelScores:
    """One student's sweep (StudentEval.to_json) over its training seeds."""
    values = [r["straightness"] for r in per_seed]
    straightness, straightness_ci = interval(values)
    return ModelScores(
        rows=[Score.from_json(r) for r in _rows([r["rows"] for r in per_seed], ("solver", "steps"))],
        seeds=len(per_seed),
        memorisation=_mean_dict([r["memorisation"] for r in per_seed]),
        straightness=straightness,
        straightness_ci=straightness_ci,
        straightness_seeds=values,
        likelihood=per_seed[0].get("likelihood") or None,  # seed 0's (bits/dim through the ODE is slow)
    )


def aggregate_teacher(per_seed: Sequence[dict[str, Any]]) -> ModelScores:
    """The teacher's sweep (TeacherEval.to_json) over its training seeds."""
    bpd = [r["test_bpd"] for r in per_seed if r.get("test_bpd") is not None]
    test_bpd, test_bpd_ci = interval(bpd) if bpd and len(bpd) == len(per_seed) else (None, None)
    return ModelScores(
        rows=[Score.from_json(r) for r in _rows([r["rows"] for r in per_seed], ("sampler",))],
        seeds=len(per_seed),
        memorisation=_mean_dict([r["memorisation"] for r in per_seed]),
        test_bpd=test_bpd,
        test_bpd_ci=test_bpd_ci,
        noise_std=per_seed[0].get("noise_std"),
    )


def aggregate_seeds(
    per_seed: Sequence[dict[str, Any]], names: Sequence[str]
) -> tuple[dict[str, ModelScores], ModelScores | None]:
    """(students, teacher) over a run's per-seed results: each student over the seeds that trained it (a knob
    variant trains on the first knob_seeds only), the teacher over the seeds that scored one."""
    students = {
        name: aggregate_student([ps["students"][name] for ps in per_seed if name in ps["students"]]) for name in names
    }
    teachers = [ps["teacher"] for ps in per_seed if ps.get("teacher") is not None]
    return students, aggregate_teacher(teachers) if teachers else None


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float | None]:
    """(mean, half-width of the t-interval) of the per-seed differences a_k - b_k: the comparison of two
    quantities measured on the same seeds (a student against its own seed's teacher), which removes what
    the seeds share from the spread."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same seeds: {len(a)} against {len(b)}")
    return interval([x - y for x, y in zip(a, b, strict=True)], level)


def winner(cells: dict[str, tuple[float, float | None]]) -> str | None:
    """The model whose interval lies wholly below every other's (lower is better), or None: no intervals
    (one seed), fewer than two models, or overlapping intervals."""
    if len(cells) < 2 or any(ci is None for _, ci in cells.values()):
        return None
    best = min(cells, key=lambda k: cells[k][0])
    top = cells[best][0] + cells[best][1]
    if all(m - ci > top for k, (m, ci) in cells.items() if k != best):
        return best
    return None
