"""The training stages of one seed of `nfm run`: the teacher (trained, reused or loaded), its pair cache, one
student per coupling (reflow couplings after their source student), the compute-matched baselines and the NFM
knob variants. Each stage's directory is named by a hash of its inputs, so a rerun reuses what is finished."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from nfm.core.config import config_hash, from_dict
from nfm.core.data import DataConfig
from nfm.core.io import check_free_space
from nfm.pairs.build import PairBuildConfig, PairBuildResult, build_pairs
from nfm.pipeline.evaluate import check_extractor, default_extractor
from nfm.pipeline.run.budget import budget_flops, matched_steps
from nfm.pipeline.run.config import (
    REFLOW_FROM,
    RunConfig,
    crossed,
    knob_config,
    knob_name,
    needs_teacher,
    seed_range,
    seeded,
    student_name,
)
from nfm.pipeline.run.context import RunContext, SeedContext, SeedRun
from nfm.student.train import StudentRunConfig, run_student_training
from nfm.teacher.protocol import Teacher, load_teacher_spec
from nfm.teacher.train import run_teacher_training


def stage_teacher(s: SeedContext) -> tuple[Teacher, dict[str, Any], str]:
    """Stage 1: train (or reuse) the teacher, or load --from-teacher (its data, where it names one, becomes the
    seed's data); returns (teacher, info, where it came from: its export, or the --from-teacher spec)."""
    run, t0 = s.run, time.perf_counter()
    if run.from_teacher:  # an export, ml-tarflow:PATH or python:module:factory; data: its own, else the preset's
        teacher, info = load_teacher_spec(run.from_teacher, run.device, run.teacher_arch)
        if info.get("data"):
            s.data_cfg = from_dict(DataConfig, info["data"])
        s.done("teacher (--from-teacher)", True, t0)
        return teacher, info, run.from_teacher
    tdir = run.run_dir / f"teacher-{config_hash(s.cfg.teacher)}"
    reused = (tdir / "export" / "config.json").is_file()
    export = run_teacher_training(s.cfg.teacher, tdir, echo_config=False)  # in tdir/log.txt; the run printed it
    teacher, info = load_teacher_spec(str(export), run.device)
    s.done("teacher", reused, t0)
    if not reused:
        s.costs.record("teacher", run.stages.timings[-1]["seconds"])
    return teacher, info, str(export)


def stage_pairs(s: SeedContext, teacher: Teacher, info: dict[str, Any], pcfg: PairBuildConfig, name: str):
    """Stage 2: the teacher's pair cache of the seed's training data (built once, shared across runs)."""
    t0 = time.perf_counter()
    pairs = build_pairs(teacher, s.train_data(), pcfg, s.run.cache_root, log=s.log.info, teacher_info=info)
    s.done(name, pairs.hit, t0)
    return pairs


def reflow_pairs(s: SeedContext, source: Path, name: str) -> PairBuildResult:
    """The reflow cache of a trained student: `n` ODE solves of it (built once, shared across runs)."""
    from nfm.pairs.reflow import build_reflow_pairs
    from nfm.student.reflow import StudentGenerator

    rc, t0 = s.cfg.reflow, time.perf_counter()
    gen = StudentGenerator(source, s.run.device, rc.solver, rc.steps)
    pcfg = PairBuildConfig(seed=rc.seed, batch_size=rc.batch_size)
    built = build_reflow_pairs(gen, rc.n, pcfg, s.run.cache_root, log=s.log.info)
    if not built.hit:
        s.costs.record(f"{name} pairs", time.perf_counter() - t0, pairs=built.total_rows, solver=rc.solver,
                       nfe=gen.provenance()["nfe"])  # fmt: skip
    return built


def train_student(s: SeedContext, scfg: StudentRunConfig, name: str, kind: str) -> Path:
    """Train (or reuse) one student in RUN/students/KIND-HASH; returns its export."""
    t0 = time.perf_counter()
    sdir = s.run.run_dir / "students" / f"{kind}-{config_hash(scfg)}"
    reused = (sdir / "export" / "config.json").is_file()
    export = run_student_training(scfg, sdir, s.run.cache_root, echo_config=False)
    s.done(f"student {name}", reused, t0)
    return export


def stage_students(s: SeedContext, pairs: PairBuildResult | None) -> dict[str, Path]:
    """Stage 3: one student per coupling and objective, the same network, steps and batch for every one. A
    reflow coupling first trains (or reuses) its source student (flow matching), then builds its pair cache
    from it; the one-step students of a coupling train on the same pairs as its flow-matching student."""
    students: dict[str, Path] = {}
    sources = [c for c in ("independent", "nfm") if any(REFLOW_FROM.get(r) == c for r in s.cfg.couplings)]
    order = sources + [c for c in s.cfg.couplings if c not in sources]
    jobs = [(c, "fm") for c in (order if "fm" in s.cfg.objectives else sources)]
    jobs += [(c, o) for o in s.cfg.objectives if o != "fm" for c in s.cfg.couplings]
    pairs_dirs: dict[str, str] = {}
    for coupling, objective in jobs:
        if coupling not in pairs_dirs:
            pairs_dirs[coupling] = ""
            if coupling == "nfm":
                pairs_dirs[coupling] = str(pairs.path.resolve())
            elif coupling in REFLOW_FROM:
                source = students[REFLOW_FROM[coupling]]
                pairs_dirs[coupling] = str(reflow_pairs(s, source, coupling).path.resolve())
        scfg = s.student_cfg(coupling, pairs_dirs[coupling])
        scfg = replace(scfg, flow=replace(scfg.flow, objective=objective))
        name = student_name(coupling, objective)
        students[name] = train_student(s, scfg, name, coupling if objective == "fm" else f"{coupling}-{objective}")
        if coupling == "sd-ot":  # the fit the students of every objective share
            record_sdot(s, scfg)
    return students  # the run's couplings x objectives and the source students of its reflow couplings


def stage_knobs(
    s: SeedContext, teacher: Teacher, info: dict[str, Any], nfm: Path
) -> tuple[dict[str, Path], dict[str, str]]:
    """The NFM variants of `knobs`: each its own pair cache (when its pairs settings differ) and student; a knob
    of the prior alone (prior=gaussian) is the `nfm` student itself (`nfm`: its export), sampled from another
    prior. Returns the exports and those priors."""
    cfg, out, priors = s.cfg, {}, {}
    for knob in cfg.knobs:
        kc, name = knob_config(cfg, knob), knob_name(knob)
        if kc.pairs == cfg.pairs and replace(kc.student, sample=cfg.student.sample) == cfg.student:
            out[name], priors[name] = nfm, kc.student.sample.prior
            continue
        pairs = stage_pairs(s, teacher, info, kc.pairs, f"pairs {name}")
        out[name] = train_student(s, s.student_cfg("nfm", str(pairs.path.resolve()), kc), name, "nfm")
    return out, priors


def stage_matched(s: SeedContext, flops: dict[str, float] | None, students: dict[str, Path]) -> dict[str, Path]:
    """The baselines of `compute_matched`, trained again for NFM's total compute."""
    cfg, out = s.cfg, {}
    for coupling in cfg.compute_matched:
        m = matched_steps(cfg, coupling, flops, students, s.costs)
        s.log.info(f"{coupling} at NFM's total compute ({m['by']}): {m['steps']} steps, not {m['base_steps']}")
        longer = replace(cfg, student=replace(cfg.student, train=replace(cfg.student.train, steps=m["steps"])))
        name = f"{coupling}@matched"
        out[name] = train_student(s, s.student_cfg(coupling, "", longer), name, coupling)
    return out


def record_sdot(s: SeedContext, scfg: StudentRunConfig) -> None:
    """The fit's metadata (written by the sd-ot student's training) into the run's costs."""
    from nfm.student.sdot import read_meta, sdot_dir

    meta = read_meta(sdot_dir(s.run.data(scfg.data, "train"), scfg.flow.sdot, s.run.cache_root)[0])
    s.costs.record("sd-ot fit", meta["fit_seconds"], shares=meta["shares"], key=meta["key"], groups=meta["groups"])


def train_seed(run: RunContext, cfg: RunConfig, k: int) -> SeedRun:
    """Teacher, pairs and every student of training seed k (cfg: seeded(run config, k))."""
    s = SeedContext.make(run, cfg, k)
    if s.prefix:
        s.log.info(f"training seed {k} (seeds {cfg.first_seed} to {cfg.first_seed + cfg.seeds - 1})")
    teacher, info, pairs, source = None, {}, None, None
    if needs_teacher(cfg):
        teacher, info, source = stage_teacher(s)
        if run.from_teacher and k == cfg.first_seed:  # its data is known now: check the evaluation's feature network
            check_extractor(cfg.eval.extractor or default_extractor(s.data_cfg.name))
        t0 = time.perf_counter()
        pairs = stage_pairs(s, teacher, info, cfg.pairs, "pairs")
        if not pairs.hit:
            s.costs.record("nfm pairs", time.perf_counter() - t0, pairs=pairs.total_rows)
    else:
        s.log.info(f"no teacher: the couplings {', '.join(cfg.couplings)} do not use one (eval.teacher=false)")
    trained = stage_students(s, pairs)
    evaluated = {name: trained[name] for name in crossed(cfg)}
    if cfg.compute_matched:
        flops = budget_flops(cfg, teacher, s.train_data(), not run.from_teacher) if cfg.matched_by == "flops" else None
        matched = stage_matched(s, flops, trained)
        trained.update(matched)
        evaluated.update(matched)
    priors: dict[str, str] = {}
    if cfg.knobs and k < cfg.knob_seeds:
        knobs, priors = stage_knobs(s, teacher, info, trained["nfm"])
        trained.update(knobs)
        evaluated.update(knobs)
    return SeedRun(s, teacher, source, pairs, trained, evaluated, priors)


def check_pair_space(run: RunContext, cfg: RunConfig) -> None:
    """Before the first stage: room under the cache root for the pair cache of every seed whose teacher is
    not trained yet (where a teacher exists, nothing is lost by the pair build's own check)."""
    from nfm.pairs.build import estimate_cache_bytes

    fresh = [k for k in seed_range(cfg) if not (run.run_dir / f"teacher-{config_hash(seeded(cfg, k).teacher)}"
             / "export" / "config.json").is_file()]  # fmt: skip
    if not fresh:
        return
    per_cache = estimate_cache_bytes(run.data(cfg.teacher.data, cfg.pairs.split), cfg.pairs)
    check_free_space(
        run.cache_root,
        per_cache * len(fresh),
        f"the NFM pair cache{'s' if len(fresh) > 1 else ''} of {len(fresh)} seed{'s' if len(fresh) > 1 else ''}",
        "free space there, or put the caches elsewhere (--cache-dir, or NFM_CACHE_DIR)",
    )
