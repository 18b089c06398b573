"""`nfm run`: teacher -> pairs -> students (nfm, independent, minibatch-ot) -> evaluation -> report.

Every stage writes into a directory named by a hash of its inputs, so rerunning the same command
reuses each finished stage (and says so), resumes an interrupted one, and a changed setting
reruns only what depends on it:

    RUN/teacher-HASH/             the teacher run (or --from-teacher EXPORT)
    CACHE_ROOT/pairs/KEY/         the pair cache (shared across runs)
    RUN/students/COUPLING-HASH/   one student per coupling, same network, steps and batch
    RUN/eval/NAME-HASH.json       FID/KID sweeps (+ .safetensors of the sample grids)
    RUN/report.md, report.json, fid_vs_nfe.png, samples/*.png
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from nfm.pairs.build import PairBuildConfig, PairBuildResult, build_pairs
from nfm.pairs.format import INDEX_NAME
from nfm.pairs.lookup import default_cache_root
from nfm.pipeline.core.config import check_choices, format_table, from_dict, to_dict
from nfm.pipeline.core.data import DataConfig, ImageDataset, load_data
from nfm.pipeline.core.distributed import process_state
from nfm.pipeline.core.errors import NFMError
from nfm.pipeline.core.io import load_tensors, read_json, save_tensors, sha256_file, write_json
from nfm.pipeline.core.rundir import setup_logger
from nfm.pipeline.evaluate import EvalSet, StudentEval, TeacherEval, default_extractor, student_sweep, teacher_sweep
from nfm.student.couplings import CouplingName
from nfm.student.sampling import Solver
from nfm.student.train import StudentRunConfig, load_student, run_student_training
from nfm.teacher.protocol import Teacher, load_teacher_spec
from nfm.teacher.train import TeacherRunConfig, evaluate_bpd, run_teacher_training


@dataclass(frozen=True)
class EvalConfig:
    n: int = 1000  # samples per evaluation (fixed noise, labels with the held-out class histogram)
    seed: int = 2024
    extractor: str = ""  # "" = nfm-DATA for built-in data, else inception-v3-fid-helper
    euler_nfes: tuple[int, ...] = (1, 2, 4, 8)
    higher_solver: Solver = "heun"  # a higher-order solver at a moderate NFE ...
    higher_steps: int = 4  # ... (heun, 4 steps = NFE 8)
    dopri5: bool = True  # adaptive, NFE measured
    straightness_steps: int = 32
    teacher: bool = True  # evaluate the teacher's samples too
    # the students' bits/dim through the ODE on held-out x + eta * eps (eta: the teacher's); slow on a CPU
    likelihood: bool = False
    likelihood_n: int = 0  # held-out images (0: all)
    likelihood_solver: Solver = "dopri5"
    likelihood_hutchinson: int = -1  # probes; -1: exact divergence up to 1,024 dimensions, 8 probes above


@dataclass(frozen=True)
class RunConfig:
    teacher: TeacherRunConfig = field(default_factory=TeacherRunConfig)
    pairs: PairBuildConfig = field(default_factory=PairBuildConfig)
    student: StudentRunConfig = field(default_factory=StudentRunConfig)
    couplings: tuple[CouplingName, ...] = ("nfm", "independent", "minibatch-ot")
    eval: EvalConfig = field(default_factory=EvalConfig)


def config_hash(obj: Any) -> str:
    d = to_dict(obj) if hasattr(obj, "__dataclass_fields__") else obj
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Stages:
    """Times each stage and says whether it was reused."""

    def __init__(self, log: logging.Logger):
        self.log, self.timings = log, []

    def done(self, name: str, reused: bool, t0: float) -> None:
        self.timings.append({"stage": name, "seconds": round(time.perf_counter() - t0, 1), "reused": reused})
        self.log.info(f"[{name}] {'reused' if reused else 'done'} in {self.timings[-1]['seconds']:.1f}s")


def _stage_teacher(
    cfg: RunConfig, run_dir: Path, from_teacher: str | None, teacher_arch: str | None, device, stages: _Stages
) -> tuple[Teacher, dict[str, Any], DataConfig]:
    """Stage 1: train (or reuse) the teacher, or load --from-teacher; returns (teacher, info, its data)."""
    t0 = time.perf_counter()
    if from_teacher:  # an export, ml-tarflow:PATH or python:module:factory; data: its own, else the preset's
        teacher, info = load_teacher_spec(from_teacher, device, teacher_arch)
        data_cfg = from_dict(DataConfig, info["data"]) if info.get("data") else cfg.teacher.data
        stages.done("teacher (--from-teacher)", True, t0)
        return teacher, info, data_cfg
    tdir = run_dir / f"teacher-{config_hash(cfg.teacher)}"
    reused = (tdir / "export" / "config.json").is_file()
    export = run_teacher_training(cfg.teacher, tdir)
    teacher, info = load_teacher_spec(str(export), device)
    stages.done("teacher", reused, t0)
    return teacher, info, cfg.teacher.data


def _stage_students(
    cfg: RunConfig, run_dir: Path, data_cfg: DataConfig, pairs: PairBuildResult, cache_root: Path, stages: _Stages
) -> dict[str, Path]:
    """Stage 3: one student per coupling, the same network, steps and batch for every coupling."""
    students: dict[str, Path] = {}
    for coupling in cfg.couplings:
        t0 = time.perf_counter()
        pairs_dir = str(pairs.path.resolve()) if coupling == "nfm" else ""
        scfg = replace(cfg.student, data=data_cfg, flow=replace(cfg.student.flow, coupling=coupling, pairs=pairs_dir))
        sdir = run_dir / "students" / f"{coupling}-{config_hash(scfg)}"
        reused = (sdir / "export" / "config.json").is_file()
        students[coupling] = run_student_training(scfg, sdir, cache_root)
        stages.done(f"student {coupling}", reused, t0)
    return students


def _cached(path: Path, compute: Callable[[], Any], cls: type) -> tuple[Any, bool]:
    """An evaluation (StudentEval / TeacherEval) cached as JSON + its grids as safetensors; computed once per
    input hash. Returns (result, reused)."""
    grids_path = path.with_suffix(".safetensors")
    if path.is_file() and grids_path.is_file():
        return cls.from_json(read_json(path, "evaluation"), load_tensors(grids_path, "evaluation grids")), True
    result = compute()
    result.grids = {k: v[:100].contiguous() for k, v in result.grids.items()}
    save_tensors(grids_path, result.grids)
    write_json(path, result.to_json())
    return result, False


@dataclass
class _EvalContext:
    """What every evaluation of one run shares: the settings, the evaluation set, the cache of results."""

    ev: EvalConfig
    on: EvalSet
    eval_dir: Path
    key: str  # hash of the evaluation settings: part of every cached result's name
    log: logging.Logger

    @classmethod
    def make(cls, ev: EvalConfig, data_cfg: DataConfig, train_data: ImageDataset, run_dir: Path, log) -> _EvalContext:
        extractor = ev.extractor or default_extractor(data_cfg.name)
        reference, ref_labels = load_data(data_cfg, "test").tensors()
        if len(train_data) <= 100_000:
            train_images = train_data.tensors()[0]
        else:
            train_images = train_data.__getitems__(list(range(100_000)))[0]
        on = EvalSet(reference, ref_labels, train_images, extractor, ev.n, ev.seed)
        key = config_hash({"eval": asdict(ev), "extractor": extractor, "reference": len(reference)})
        return cls(ev, on, run_dir / "eval", key, log)


def _evaluate_teacher(ctx: _EvalContext, teacher: Teacher, data_cfg: DataConfig) -> tuple[TeacherEval, bool]:
    ctx.log.info(f"evaluating the teacher ({ctx.ev.n} samples, {ctx.on.extractor})")

    def compute() -> TeacherEval:
        out = teacher_sweep(teacher, ctx.on, log=ctx.log.info)
        if callable(getattr(teacher, "log_prob", None)):
            out.test_bpd = evaluate_bpd(teacher, load_data(data_cfg, "test"))
        out.noise_std = teacher.noise_std
        return out

    return _cached(ctx.eval_dir / f"teacher-{teacher.fingerprint()}-{ctx.key}.json", compute, TeacherEval)


def _evaluate_student(ctx: _EvalContext, coupling: str, export: Path, eta: float, device) -> tuple[StudentEval, bool]:
    ev, on = ctx.ev, ctx.on
    ctx.log.info(f"evaluating the {coupling} student")
    model, meta = load_student(export, device)

    def compute() -> StudentEval:
        out = student_sweep(
            model, meta, on, euler_nfes=ev.euler_nfes, higher=((ev.higher_solver, ev.higher_steps),),
            dopri5=ev.dopri5, straightness_steps=ev.straightness_steps, log=ctx.log.info,
        )  # fmt: skip
        if ev.likelihood:
            from nfm.student.likelihood import student_bpd

            m = ev.likelihood_n or len(on.reference)
            ctx.log.info(f"  bits/dim of the {coupling} student through the ODE ({m} held-out images)")
            out.likelihood = student_bpd(
                model, meta, on.reference[:m], on.reference_labels[:m], eta=eta, hutchinson=ev.likelihood_hutchinson,
                solver=ev.likelihood_solver,
            )  # fmt: skip
            ctx.log.info(f"  bits/dim {out.likelihood['bits_per_dim']:.4f} ({out.likelihood['divergence']})")
        return out

    fp = sha256_file(export / "model.safetensors")[:16]
    return _cached(ctx.eval_dir / f"student-{coupling}-{fp}-{ctx.key}.json", compute, StudentEval)


def _stage_evaluation(
    ctx: _EvalContext, teacher: Teacher, data_cfg: DataConfig, students: dict[str, Path], device, stages: _Stages
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Stage 4 (main process): FID/KID of the teacher and every student; returns (results, grids)."""
    t0, ev, on = time.perf_counter(), ctx.ev, ctx.on
    floor_n = min(len(on.train_images), max(ev.n, len(on.reference)))
    results: dict[str, Any] = {
        "n": ev.n,
        "seed": ev.seed,
        "extractor": on.extractor,
        "reference": len(on.reference),
        "students": {},
        "teacher": None,
        "data_floor": on.fid_kid(on.train_images[:floor_n]),
    }
    grids: dict[str, dict[str, torch.Tensor]] = {}
    reused_all = True
    if ev.teacher:
        res, reused = _evaluate_teacher(ctx, teacher, data_cfg)
        results["teacher"], grids["teacher"], reused_all = res.to_json(), res.grids, reused_all and reused
    for coupling, export in students.items():
        res, reused = _evaluate_student(ctx, coupling, export, teacher.noise_std, device)
        results["students"][coupling], grids[coupling] = res.to_json(), res.euler_grids(8)
        reused_all = reused_all and reused
    stages.done("evaluation", reused_all, t0)
    return results, grids


def run_pipeline(
    cfg: RunConfig,
    run_dir: Path,
    preset: str = "custom",
    from_teacher: str | None = None,
    cache_root: Path | None = None,
    teacher_arch: str | None = None,
) -> Path | None:
    """Run (or resume, or reuse) every stage; returns the report path (None on non-main processes)."""
    run_dir = Path(run_dir)
    check_choices(cfg)
    if not cfg.couplings:
        raise NFMError("couplings must name at least one coupling")
    state = process_state()
    log = setup_logger(run_dir, name="nfm.run", main=state.is_main_process)
    log.info(format_table(cfg, f"nfm run --preset {preset} -> {run_dir}"))
    if state.is_main_process:
        write_json(run_dir / "config.json", {"preset": preset, "from_teacher": from_teacher, **to_dict(cfg)})
    cache_root = Path(cache_root or default_cache_root())
    stages, t_all = _Stages(log), time.perf_counter()

    teacher, teacher_info, data_cfg = _stage_teacher(cfg, run_dir, from_teacher, teacher_arch, state.device, stages)
    t0 = time.perf_counter()
    train_data = load_data(data_cfg, cfg.pairs.split)
    pairs = build_pairs(teacher, train_data, cfg.pairs, cache_root, log=log.info, teacher_info=teacher_info)
    stages.done("pairs", pairs.hit, t0)
    students = _stage_students(cfg, run_dir, data_cfg, pairs, cache_root, stages)
    if not state.is_main_process:
        return None

    ctx = _EvalContext.make(cfg.eval, data_cfg, train_data, run_dir, log)
    results, grids = _stage_evaluation(ctx, teacher, data_cfg, students, state.device, stages)
    results = {"preset": preset, **results}
    results["timings"] = stages.timings
    results["total_seconds"] = round(time.perf_counter() - t_all, 1)
    results["peak_rss_mb"] = _peak_rss_mb()
    results["pair_cache"] = {"key": pairs.key, "path": str(pairs.path), "index": str(pairs.path / INDEX_NAME)}
    from nfm.pipeline.report import write_report

    report = write_report(results, grids, run_dir)
    log.info(f"report: {report}")
    return report
