"""`nfm report merge`: the report of one `nfm run --seeds N` whose seeds were trained by several runs — on several
machines, or in several sessions (`--seeds 1 --first-seed 1` here, `--seeds 1 --first-seed 2` there).

Each run's report.json keeps every seed's sweep (per_seed) and the run's settings (config). The merge checks that
the runs differ in nothing but the seeds they trained, that together they give each seed once and leave none out
between the first and the last, and averages the seeds again with the functions the evaluation uses: the merged
report is the one a single run over all the seeds writes (its timings aside). The sample figures, FID's floor
and its sampling spread are those of the run that holds the lowest seed, as they are seed 0's in a single run.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from nfm.core.errors import NFMError
from nfm.core.io import read_json, write_json
from nfm.pipeline.aggregate import aggregate_seeds
from nfm.pipeline.report import grid_files, read_results, write_report
from nfm.pipeline.results import RunResults
from nfm.pipeline.run.evaluation import guided_rows

SEED_KEYS = ("seeds", "first_seed")  # the settings the merged runs may differ in
_ABSENT = "(its default)"


@dataclasses.dataclass
class _Part:
    run: Path
    results: RunResults
    settings: dict[str, Any]
    seeds: list[int]


def _read(run: Path) -> _Part:
    if not (run / "report.json").is_file():
        raise NFMError(f"{run} holds no report.json: name the directories of finished `nfm run` commands")
    results = read_results(run)
    settings = results.config
    if settings is None:  # reports written before report.json recorded the settings
        if not (run / "config.json").is_file():
            raise NFMError(
                f"{run}/report.json does not record the run's settings and there is no config.json beside it: "
                "copy the run's config.json into that directory"
            )
        settings = read_json(run / "config.json", "run config")
    if not results.per_seed:
        raise NFMError(
            f"{run}/report.json keeps no per-seed results (an older nfm wrote it): rerun its `nfm run` command "
            "there, which writes the report again from the cached evaluations"
        )
    results.config = settings
    return _Part(run, results, settings, results.seed_ids())


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def _check(parts: list[_Part]) -> None:
    """Only the seeds differ; each seed once; none missing between the first and the last."""
    base = _flat({k: v for k, v in parts[0].settings.items() if k not in SEED_KEYS})
    for p in parts[1:]:
        other = _flat({k: v for k, v in p.settings.items() if k not in SEED_KEYS})
        diff = sorted(k for k in base.keys() | other.keys() if base.get(k, _ABSENT) != other.get(k, _ABSENT))
        if diff:
            shown = "; ".join(f"{k}: {other.get(k, _ABSENT)} against {base.get(k, _ABSENT)}" for k in diff[:3])
            more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
            raise NFMError(
                f"{p.run} was run with other settings than {parts[0].run} ({shown}{more}): merge the runs of one "
                "command, which differ only in --seeds and --first-seed"
            )
    seen: dict[int, Path] = {}
    for p in parts:
        for k in p.seeds:
            if k in seen:
                raise NFMError(f"training seed {k} is in the reports of {seen[k]} and {p.run}: give each seed once")
            seen[k] = p.run
    missing = sorted(set(range(min(seen), max(seen) + 1)) - set(seen))
    if missing:
        raise NFMError(
            f"no report gives training seed{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}: run "
            f"it (`nfm run ... --seeds 1 --first-seed {missing[0]}`) and merge its report with these"
        )


def _stage(name: str, p: _Part) -> str:
    """A timing's stage named by its seed(s), as a run of several seeds names them."""
    if name == "evaluation":
        return f"evaluation of seed{'s' if len(p.seeds) > 1 else ''} {', '.join(map(str, p.seeds))}"
    return name if name.startswith("seed ") else f"seed {p.seeds[0]}: {name}"


def merge_results(parts: list[_Part]) -> RunResults:
    """The results of one run over every part's seeds (parts sorted by their first seed)."""
    first = parts[0]
    per_seed = [{**ps, "seed": k} for p in parts for k, ps in zip(p.seeds, p.results.per_seed or [], strict=True)]
    students, teacher = aggregate_seeds(per_seed, list(dict.fromkeys(n for p in parts for n in p.results.students)))
    exports: dict[str, list[str]] = {}
    for p in parts:
        for model, paths in (p.results.exports or {}).items():
            exports.setdefault(model, []).extend(paths)
    guidance = None
    if all(p.results.guidance for p in parts):
        guidance = {**(first.results.guidance or {}), "rows": guided_rows(per_seed)}
    settings = {**first.settings, "seeds": len(per_seed)}
    settings.pop("first_seed", None)
    if per_seed[0]["seed"]:
        settings["first_seed"] = per_seed[0]["seed"]
    return dataclasses.replace(
        first.results,
        students=students,
        teacher=teacher,
        seeds=len(per_seed),
        per_seed=per_seed,
        guidance=guidance,
        exports=exports or None,
        timings=[{**t, "stage": _stage(t["stage"], p)} for p in parts for t in p.results.timings],
        total_seconds=sum(p.results.total_seconds or 0.0 for p in parts),
        peak_rss_mb=max((p.results.peak_rss_mb for p in parts if p.results.peak_rss_mb), default=None),
        config=settings,
        merged_from=[{"run": str(p.run), "seeds": p.seeds} for p in parts],
    )


def merge_reports(runs: list[Path], out: Path) -> Path:
    """report.json, report.md and the figures of the runs' seeds together, under `out`; returns report.md."""
    runs, out = [Path(r) for r in runs], Path(out)
    if len(runs) < 2:
        raise NFMError("nfm report merge joins the reports of two or more runs: name each run directory")
    named = [r.resolve() for r in runs]
    twice = next((r for r in runs if named.count(r.resolve()) > 1), None)
    if twice is not None:
        raise NFMError(f"{twice} is named twice: name each run directory once")
    if out.resolve() in named:
        raise NFMError(f"--out {out} is one of the runs it merges: write the merged report to a directory of its own")
    parts = sorted((_read(r) for r in runs), key=lambda p: p.seeds[0])
    _check(parts)
    merged = merge_results(parts)
    out.mkdir(parents=True, exist_ok=True)
    src = parts[0].run  # the sample figures of the lowest seed, as a single run shows seed 0's
    if (src / "samples").is_dir():
        shutil.copytree(src / "samples", out / "samples", dirs_exist_ok=True)
    if (src / "samples.png").is_file():
        shutil.copy2(src / "samples.png", out / "samples.png")
    write_json(out / "config.json", merged.config)
    return write_report(merged, {}, out, grid_files(merged, out))
