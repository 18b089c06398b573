"""`nfm run`: teacher -> pairs -> students (one per coupling in `couplings`) -> evaluation -> report.

Every stage writes into a directory named by a hash of its inputs, so rerunning the same command
reuses each finished stage (and says so), resumes an interrupted one, and a changed setting
reruns only what depends on it:

    RUN/teacher-HASH/             the teacher run (or --from-teacher EXPORT)
    CACHE_ROOT/pairs/KEY/         the pair cache (shared across runs)
    RUN/students/COUPLING-HASH/   one student per coupling, same network, steps and batch
    CACHE_ROOT/sdot/KEY/          sd-ot: the semidiscrete OT weights of the training set (shared across runs)
    CACHE_ROOT/pairs/KEY/         reflow / nfm-reflow: pairs (z, ODE(z)) of the independent / nfm student
    RUN/costs.json                what each coupling cost to prepare (teacher, pair encode, OT fit, reflow solves)
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
from typing import Any, Literal

import torch

from nfm.pairs.build import PairBuildConfig, PairBuildResult, build_pairs
from nfm.pairs.format import INDEX_NAME
from nfm.pairs.lookup import default_cache_root
from nfm.pipeline.core.config import AtLeast1, Scale, added, check_choices, format_table, from_dict, to_dict
from nfm.pipeline.core.data import DataConfig, ImageDataset, load_data
from nfm.pipeline.core.distributed import process_state
from nfm.pipeline.core.errors import NFMError
from nfm.pipeline.core.io import load_tensors, read_json, save_tensors, sha256_file, write_json
from nfm.pipeline.core.rundir import setup_logger
from nfm.pipeline.evaluate import EvalSet, StudentEval, TeacherEval, default_extractor, student_sweep, teacher_sweep
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


# the couplings of a run: every student coupling, plus nfm-reflow (reflow from the nfm student; `reflow` is
# from the independent student, i.e. 2-rectified flow)
RunCoupling = Literal["nfm", "independent", "minibatch-ot", "sd-ot", "sb", "reflow", "nfm-reflow"]
REFLOW_FROM = {"reflow": "independent", "nfm-reflow": "nfm"}


@dataclass(frozen=True)
class ReflowConfig:
    n: AtLeast1 = 10_000  # pairs (z, ODE(z))
    solver: Solver = "heun"
    steps: AtLeast1 = 8  # fixed-step solvers (heun 8 = NFE 16)
    seed: int = 1  # noise seed of the reflow pairs (the teacher's pairs use pairs.seed)
    batch_size: AtLeast1 = 500


@dataclass(frozen=True)
class RunConfig:
    teacher: TeacherRunConfig = field(default_factory=TeacherRunConfig)
    pairs: PairBuildConfig = field(default_factory=PairBuildConfig)
    student: StudentRunConfig = field(default_factory=StudentRunConfig)
    couplings: tuple[RunCoupling, ...] = ("nfm", "independent", "minibatch-ot")
    eval: EvalConfig = field(default_factory=EvalConfig)
    sb_sigma: Scale = added(0.5)  # the sb student: flow.path=bridge, flow.sigma=sb_sigma (plan reg 2 sigma^2)
    reflow: ReflowConfig = added(ReflowConfig())  # the reflow / nfm-reflow pair caches


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


class _Costs:
    """RUN/costs.json: seconds each coupling's preparation took when it ran (kept across reuse)."""

    def __init__(self, run_dir: Path, main: bool):
        self.path, self.main = run_dir / "costs.json", main
        self.data: dict[str, Any] = read_json(self.path, "costs") if self.path.is_file() else {}

    def record(self, name: str, seconds: float, **extra: Any) -> None:
        self.data[name] = {"seconds": round(seconds, 1), **extra}
        if self.main:
            write_json(self.path, self.data)


def _student_cfg(cfg: RunConfig, coupling: str, data_cfg: DataConfig, pairs_dir: str) -> StudentRunConfig:
    flow = replace(cfg.student.flow, coupling="reflow" if coupling in REFLOW_FROM else coupling, pairs=pairs_dir)
    if coupling == "sb":
        flow = replace(flow, path="bridge", sigma=cfg.sb_sigma or flow.sigma)
    return replace(cfg.student, data=data_cfg, flow=flow)


def _reflow_pairs(
    cfg: RunConfig, source: Path, cache_root: Path, costs: _Costs, name: str, log: logging.Logger
) -> PairBuildResult:
    """The reflow cache of a trained student: `n` ODE solves of it (built once, shared across runs)."""
    from nfm.pairs.reflow import build_reflow_pairs
    from nfm.student.reflow import StudentGenerator

    rc = cfg.reflow
    t0 = time.perf_counter()
    gen = StudentGenerator(source, process_state().device, rc.solver, rc.steps)
    pcfg = PairBuildConfig(seed=rc.seed, batch_size=rc.batch_size)
    built = build_reflow_pairs(gen, rc.n, pcfg, cache_root, log=log.info)
    if not built.hit:
        costs.record(f"{name} pairs", time.perf_counter() - t0, pairs=built.total_rows, solver=rc.solver,
                     nfe=gen.provenance()["nfe"])  # fmt: skip
    return built


def _stage_students(
    cfg: RunConfig,
    run_dir: Path,
    data_cfg: DataConfig,
    pairs: PairBuildResult | None,
    cache_root: Path,
    stages: _Stages,
    costs: _Costs,
) -> dict[str, Path]:
    """Stage 3: one student per coupling, the same network, steps and batch for every coupling. A reflow
    coupling first trains (or reuses) its source student, then builds its pair cache from it."""
    students: dict[str, Path] = {}
    order = [c for c in ("independent", "nfm") if any(REFLOW_FROM.get(r) == c for r in cfg.couplings)]
    order += [c for c in cfg.couplings if c not in order]
    for coupling in order:
        t0 = time.perf_counter()
        pairs_dir = ""
        if coupling == "nfm":
            pairs_dir = str(pairs.path.resolve())
        elif coupling in REFLOW_FROM:
            src = REFLOW_FROM[coupling]
            pairs_dir = str(_reflow_pairs(cfg, students[src], cache_root, costs, coupling, stages.log).path.resolve())
        scfg = _student_cfg(cfg, coupling, data_cfg, pairs_dir)
        sdir = run_dir / "students" / f"{coupling}-{config_hash(scfg)}"
        reused = (sdir / "export" / "config.json").is_file()
        students[coupling] = run_student_training(scfg, sdir, cache_root)
        if coupling == "sd-ot":
            _record_sdot(scfg, cache_root, costs)
        stages.done(f"student {coupling}", reused, t0)
    return students  # the run's couplings and the source students of its reflow couplings


def _record_sdot(scfg: StudentRunConfig, cache_root: Path, costs: _Costs) -> None:
    """The fit's metadata (written by the sd-ot student's training) into the run's costs."""
    from nfm.student.sdot import META_NAME
    from nfm.student.train import sdot_dir

    directory, _ = sdot_dir(load_data(scfg.data, "train"), scfg.flow.sdot, cache_root)
    meta = read_json(directory / META_NAME, "semidiscrete OT metadata")
    costs.record("sd-ot fit", meta["fit_seconds"], shares=meta["shares"], key=meta["key"], groups=meta["groups"])


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
    ctx: _EvalContext,
    teacher: Teacher | None,
    data_cfg: DataConfig,
    students: dict[str, Path],
    device,
    stages: _Stages,
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
        "straightness_steps": ev.straightness_steps,
    }
    grids: dict[str, dict[str, torch.Tensor]] = {}
    reused_all = True
    if ev.teacher and teacher is not None:
        res, reused = _evaluate_teacher(ctx, teacher, data_cfg)
        results["teacher"], grids["teacher"], reused_all = res.to_json(), res.grids, reused_all and reused
    for coupling, export in students.items():
        res, reused = _evaluate_student(ctx, coupling, export, teacher.noise_std if teacher else 0.0, device)
        results["students"][coupling], grids[coupling] = res.to_json(), res.euler_grids(8)
        meta = read_json(Path(export) / "config.json", "student config")
        if meta["flow"].get("source", "gaussian") != "gaussian":  # the grids show (source, sample) pairs
            from nfm.student.sampling import student_inputs

            grids[coupling]["source"] = student_inputs(meta, min(ev.n, 100), seed=on.seed).eps
        reused_all = reused_all and reused
    stages.done("evaluation", reused_all, t0)
    return results, grids


def _seconds_per_step(run: Path) -> float | None:
    """Median seconds per training step of a student run, from its metrics.jsonl (img/s and the batch)."""
    metrics, config = run / "metrics.jsonl", run / "config.json"
    if not metrics.is_file() or not config.is_file():
        return None
    rates = sorted(r["img_per_s"] for r in map(json.loads, metrics.read_text().splitlines()) if r.get("img_per_s"))
    batch = read_json(config, "student config").get("train", {}).get("batch_size")
    return round(batch / rates[len(rates) // 2], 4) if rates and batch else None


def _coupling_costs(cfg: RunConfig, students: dict[str, Path], costs: _Costs) -> dict[str, Any]:
    """Per coupling: seconds per training step, and the seconds spent preparing the coupling where they were
    measured (teacher training, pair encoding, the OT fit, the reflow source student's training and solves)."""
    prep = {"nfm": ["teacher", "nfm pairs"], "sd-ot": ["sd-ot fit"], "reflow": ["reflow pairs"],
            "nfm-reflow": ["teacher", "nfm pairs", "nfm-reflow pairs"]}  # fmt: skip
    steps = cfg.student.train.steps
    out = {}
    for coupling in cfg.couplings:
        parts: dict[str, float | None] = {p: costs.data.get(p, {}).get("seconds") for p in prep.get(coupling, [])}
        if coupling in REFLOW_FROM:  # the source student's training is part of a reflow coupling's cost
            sps = _seconds_per_step(students[REFLOW_FROM[coupling]].parent)
            parts[f"{REFLOW_FROM[coupling]} student"] = None if sps is None else round(sps * steps, 1)
        out[coupling] = {
            "seconds_per_step": _seconds_per_step(students[coupling].parent),
            "prep": parts,
            "prep_seconds": None if None in parts.values() else round(sum(parts.values()), 1),
        }
        if coupling == "sd-ot" and "sd-ot fit" in costs.data:
            out[coupling]["sdot_shares"] = costs.data["sd-ot fit"]["shares"]
    return out


def needs_teacher(cfg: RunConfig) -> bool:
    """A teacher is trained (or loaded) when a coupling reads its pairs or the report evaluates it."""
    return cfg.eval.teacher or any(c in ("nfm", "nfm-reflow") for c in cfg.couplings)


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

    costs = _Costs(run_dir, state.is_main_process)
    teacher, pairs, data_cfg = None, None, cfg.teacher.data
    if needs_teacher(cfg):
        teacher, teacher_info, data_cfg = _stage_teacher(cfg, run_dir, from_teacher, teacher_arch, state.device, stages)
        if stages.timings and not stages.timings[-1]["reused"]:
            costs.record("teacher", stages.timings[-1]["seconds"])
        t0 = time.perf_counter()
        train_data = load_data(data_cfg, cfg.pairs.split)
        pairs = build_pairs(teacher, train_data, cfg.pairs, cache_root, log=log.info, teacher_info=teacher_info)
        stages.done("pairs", pairs.hit, t0)
        if not pairs.hit:
            costs.record("nfm pairs", time.perf_counter() - t0, pairs=pairs.total_rows)
    else:
        log.info(f"no teacher: the couplings {', '.join(cfg.couplings)} do not use one (eval.teacher=false)")
        train_data = load_data(data_cfg, cfg.pairs.split)
    students = _stage_students(cfg, run_dir, data_cfg, pairs, cache_root, stages, costs)
    if not state.is_main_process:
        return None

    ctx = _EvalContext.make(cfg.eval, data_cfg, train_data, run_dir, log)
    evaluated = {c: students[c] for c in cfg.couplings}
    results, grids = _stage_evaluation(ctx, teacher, data_cfg, evaluated, state.device, stages)
    results = {"preset": preset, **results}
    results["timings"] = stages.timings
    results["total_seconds"] = round(time.perf_counter() - t_all, 1)
    results["peak_rss_mb"] = _peak_rss_mb()
    results["costs"] = _coupling_costs(cfg, students, costs)
    if pairs is not None:
        results["pair_cache"] = {"key": pairs.key, "path": str(pairs.path), "index": str(pairs.path / INDEX_NAME)}
    from nfm.pipeline.report import write_report

    report = write_report(results, grids, run_dir)
    log.info(f"report: {report}")
    return report
