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

With `seeds=N` (`nfm run --seeds N`) the teacher, pairs and students are trained N times: seed k adds
1000 k to every training seed (teacher, pairs, students, OT fit, reflow noise), so seed 0 is the
single-seed run and its stages are reused. Stage directories are named by their hashes, so every
seed's stages live side by side in RUN (seed k's costs in RUN/costs-seed{k}.json). Every model is
evaluated on the same noise (eval.seed); the report gives each FID as a mean with a 95 % interval
over the seeds. Beside them:

    knobs=eta=0,views=1,mix=0.25   NFM variants (KNOBS): other pairs or student settings, same teacher
    compute_matched=independent    baselines trained again for NFM's total compute (teacher + pairs + student)
    eval.noise_seeds=M             FID's own sampling noise: seed 0's students scored on M more noise seeds
    eval.guidance=0.5,1,2          classifier-free guidance: each model's weight chosen on half the held-out split,
                                   scored on the other half (evaluate.choose_guidance)
"""

from __future__ import annotations

import json
import logging
import math
import re
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from nfm.core.config import (
    AtLeast1,
    NonNegative,
    Positive,
    Scale,
    added,
    check_choices,
    config_hash,
    format_table,
    from_dict,
    to_dict,
    with_overrides,
)
from nfm.core.data import DataConfig, ImageDataset, load_data
from nfm.core.distributed import process_state
from nfm.core.errors import NFMError
from nfm.core.io import check_free_space, load_tensors, read_json, save_tensors, sha256_file, write_json
from nfm.core.prior import Prior
from nfm.core.rundir import progress, setup_logger
from nfm.core.seeding import derive_seed, seeded_config
from nfm.pairs.build import PairBuildConfig, PairBuildResult, build_pairs
from nfm.pairs.format import INDEX_NAME
from nfm.pairs.lookup import default_cache_root
from nfm.pairs.prior import PriorConfig, prior_dir, teacher_prior
from nfm.pairs.reader import PairCache
from nfm.pipeline.aggregate import aggregate_student, aggregate_teacher, interval, spread
from nfm.pipeline.evaluate import (
    EvalSet,
    StudentEval,
    TeacherEval,
    check_extractor,
    default_extractor,
    fid_size_warning,
    student_sweep,
    teacher_sweep,
)
from nfm.student.sampling import Solver
from nfm.student.train import StudentRunConfig, load_student, run_student_training, student_prior
from nfm.teacher.protocol import Teacher, load_teacher_spec
from nfm.teacher.train import TeacherRunConfig, evaluate_bpd, run_teacher_training


@dataclass(frozen=True)
class EvalConfig:
    n: int = 1000  # samples per evaluation (fixed noise, labels with the held-out class histogram)
    seed: int = 2024
    extractor: str = ""  # "" = nfm-DATA for built-in data, else inception-v3-fid-helper
    euler_nfes: tuple[int, ...] = (1, 2, 4, 8)
    higher_solver: Solver = "heun"  # a higher-order solver at a moderate NFE ...
    higher_steps: int = 4  # ... (heun, 4 steps = NFE 7: its last step is Euler)
    dopri5: bool = True  # adaptive, NFE measured
    straightness_steps: int = 32
    teacher: bool = True  # evaluate the teacher's samples too
    # the students' bits/dim through the ODE on held-out x + eta * eps (eta: the teacher's); slow on a CPU
    likelihood: bool = False
    likelihood_n: int = 0  # held-out images (0: all)
    likelihood_solver: Solver = "dopri5"
    likelihood_hutchinson: int = -1  # probes; -1: exact divergence up to 1,024 dimensions, 8 probes above
    # FID's sampling noise: seed 0's students (Euler rows) scored again on this many other noise seeds
    noise_seeds: NonNegative = added(0)
    # the floor: this many draws of n held-out images (with replacement) scored against the held-out set
    floor_draws: AtLeast1 = added(10)
    # rtol = atol of the dopri5 row (benchmarks/eval_bench.py: on the digits students 1e-4 takes 80-86 NFE where 1e-5
    # takes 230-260, and moves FID by at most 0.016; the digits preset uses it)
    dopri5_tol: Positive = added(1e-5)
    # classifier-free guidance: these weights (and 0) tried for the teacher and every class-conditional student at
    # each of guidance_nfes, each model's weight chosen on half the held-out split, scored on the other half
    # (evaluate.choose_guidance); () = no guided rows
    guidance: tuple[float, ...] = added(())
    guidance_nfes: tuple[int, ...] = added((1, 2, 8))


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


# the baselines that can be trained again for NFM's total compute
MATCHABLE = ("independent", "minibatch-ot", "sd-ot", "sb")
MatchedBy = Literal["flops", "seconds"]

# short names of the NFM knobs (`knobs=eta=0,views=1,mix=0.25`); any pairs.* / student.* key works too, and
# "+" joins several settings into one variant (views=128+steps=3000)
KNOBS = {
    "eta": "pairs.eta_scale",  # noise added before encoding, x the teacher's eta
    "views": "pairs.views",  # noise draws (pairs) per training image
    "mix": "student.flow.mix_independent",  # fraction of each batch with independent noise
    "steps": "student.train.steps",
    "lr": "student.train.lr",
    "batch": "student.train.batch_size",
    "width": "student.model.width",
    "time": "student.flow.time",
    "prior": "student.sample.prior",  # prior=gaussian: the NFM student sampled from N(0, I), not its fitted prior
}
# the training seeds of a run (seeded): seed k adds SEED_STRIDE * k to each
RUN_SEEDS = ("teacher.train.seed", "pairs.seed", "student.train.seed", "student.flow.sdot.seed", "reflow.seed")


@dataclass(frozen=True)
class RunConfig:
    teacher: TeacherRunConfig = field(default_factory=TeacherRunConfig)
    pairs: PairBuildConfig = field(default_factory=PairBuildConfig)
    student: StudentRunConfig = field(default_factory=StudentRunConfig)
    couplings: tuple[RunCoupling, ...] = ("nfm", "independent", "minibatch-ot")
    eval: EvalConfig = field(default_factory=EvalConfig)
    sb_sigma: Scale = added(0.5)  # the sb student: flow.path=bridge, flow.sigma=sb_sigma (plan reg 2 sigma^2)
    reflow: ReflowConfig = added(ReflowConfig())  # the reflow / nfm-reflow pair caches
    seeds: AtLeast1 = added(1)  # training seeds (teacher, pairs, students); the report gives 95 % intervals
    knobs: tuple[str, ...] = added(())  # NFM variants: eta=0, views=1, mix=0.25, ... (KNOBS)
    knob_seeds: AtLeast1 = added(1)  # the knob variants train on the first knob_seeds seeds
    compute_matched: tuple[RunCoupling, ...] = added(())  # baselines trained again for NFM's total compute
    matched_by: MatchedBy = added("flops")  # flops (counted) or seconds (measured here) of teacher + pairs


def seeded(cfg: RunConfig, k: int) -> RunConfig:
    """The config of training seed k: every training seed + SEED_STRIDE * k (k = 0: cfg itself)."""
    return seeded_config(cfg, k, RUN_SEEDS)


def knob_config(cfg: RunConfig, knob: str) -> RunConfig:
    """The run config of one NFM variant: `eta=0`, `views=4+mix=0.25`, `pairs.KEY=V`, `student.KEY=V`."""
    overrides = []
    for part in knob.split("+"):
        key, sep, value = part.partition("=")
        full = KNOBS.get(key.strip(), key.strip())
        if not sep or not full.startswith(("pairs.", "student.")):
            raise NFMError(
                f"knob {part!r} is not NAME=VALUE with NAME one of {', '.join(KNOBS)} or a pairs.* / student.* "
                "key (e.g. knobs=eta=0,views=1,mix=0.25)"
            )
        overrides.append(f"{full}={value}")
    return with_overrides(cfg, overrides)


def knob_name(knob: str) -> str:
    return f"nfm[{knob}]"


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
    cfg: RunConfig,
    run_dir: Path,
    from_teacher: str | None,
    teacher_arch: str | None,
    device,
    stages: _Stages,
    prefix: str = "",
) -> tuple[Teacher, dict[str, Any], DataConfig]:
    """Stage 1: train (or reuse) the teacher, or load --from-teacher; returns (teacher, info, its data)."""
    t0 = time.perf_counter()
    if from_teacher:  # an export, ml-tarflow:PATH or python:module:factory; data: its own, else the preset's
        teacher, info = load_teacher_spec(from_teacher, device, teacher_arch)
        data_cfg = from_dict(DataConfig, info["data"]) if info.get("data") else cfg.teacher.data
        stages.done(f"{prefix}teacher (--from-teacher)", True, t0)
        return teacher, info, data_cfg
    tdir = run_dir / f"teacher-{config_hash(cfg.teacher)}"
    reused = (tdir / "export" / "config.json").is_file()
    export = run_teacher_training(cfg.teacher, tdir, echo_config=False)  # in tdir/log.txt; the run printed it
    teacher, info = load_teacher_spec(str(export), device)
    stages.done(f"{prefix}teacher", reused, t0)
    return teacher, info, cfg.teacher.data


class _Costs:
    """RUN/costs.json (seed k > 0: costs-seed{k}.json): seconds each coupling's preparation took when it ran
    (kept across reuse)."""

    def __init__(self, run_dir: Path, main: bool, seed: int = 0):
        self.path, self.main = run_dir / ("costs.json" if seed == 0 else f"costs-seed{seed}.json"), main
        self.data: dict[str, Any] = read_json(self.path, "costs") if self.path.is_file() else {}

    def record(self, name: str, seconds: float | None, **extra: Any) -> None:
        """Record a stage's seconds (None: only write what is in `data` already)."""
        if seconds is not None:
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


def _train_student(
    scfg: StudentRunConfig, name: str, kind: str, run_dir: Path, cache_root: Path, stages: _Stages, prefix: str
) -> Path:
    """Train (or reuse) one student in RUN/students/KIND-HASH; returns its export."""
    t0 = time.perf_counter()
    sdir = run_dir / "students" / f"{kind}-{config_hash(scfg)}"
    reused = (sdir / "export" / "config.json").is_file()
    export = run_student_training(scfg, sdir, cache_root, echo_config=False)
    stages.done(f"{prefix}student {name}", reused, t0)
    return export


def _stage_students(
    cfg: RunConfig,
    run_dir: Path,
    data_cfg: DataConfig,
    pairs: PairBuildResult | None,
    cache_root: Path,
    stages: _Stages,
    costs: _Costs,
    prefix: str = "",
) -> dict[str, Path]:
    """Stage 3: one student per coupling, the same network, steps and batch for every coupling. A reflow
    coupling first trains (or reuses) its source student, then builds its pair cache from it."""
    students: dict[str, Path] = {}
    order = [c for c in ("independent", "nfm") if any(REFLOW_FROM.get(r) == c for r in cfg.couplings)]
    order += [c for c in cfg.couplings if c not in order]
    for coupling in order:
        pairs_dir = ""
        if coupling == "nfm":
            pairs_dir = str(pairs.path.resolve())
        elif coupling in REFLOW_FROM:
            src = REFLOW_FROM[coupling]
            pairs_dir = str(_reflow_pairs(cfg, students[src], cache_root, costs, coupling, stages.log).path.resolve())
        scfg = _student_cfg(cfg, coupling, data_cfg, pairs_dir)
        students[coupling] = _train_student(scfg, coupling, coupling, run_dir, cache_root, stages, prefix)
        if coupling == "sd-ot":
            _record_sdot(scfg, cache_root, costs)
    return students  # the run's couplings and the source students of its reflow couplings


def _stage_knobs(
    cfg: RunConfig,
    run_dir: Path,
    teacher: Teacher,
    teacher_info: dict[str, Any],
    train_data: ImageDataset,
    data_cfg: DataConfig,
    cache_root: Path,
    stages: _Stages,
    nfm: Path,
    prefix: str = "",
) -> tuple[dict[str, Path], dict[str, str]]:
    """The NFM variants of `knobs`: each its own pair cache (when its pairs settings differ) and student; a knob
    of the prior alone (prior=gaussian) is the `nfm` student itself (`nfm`: its export), sampled from another
    prior. Returns the exports and those priors."""
    out, priors = {}, {}
    for knob in cfg.knobs:
        kc = knob_config(cfg, knob)
        if kc.pairs == cfg.pairs and replace(kc.student, sample=cfg.student.sample) == cfg.student:
            out[knob_name(knob)], priors[knob_name(knob)] = nfm, kc.student.sample.prior
            continue
        t0 = time.perf_counter()
        pairs = build_pairs(teacher, train_data, kc.pairs, cache_root, log=stages.log.info, teacher_info=teacher_info)
        stages.done(f"{prefix}pairs {knob_name(knob)}", pairs.hit, t0)
        scfg = _student_cfg(kc, "nfm", data_cfg, str(pairs.path.resolve()))
        out[knob_name(knob)] = _train_student(scfg, knob_name(knob), "nfm", run_dir, cache_root, stages, prefix)
    return out, priors


def budget_flops(cfg: RunConfig, teacher: Teacher, data: ImageDataset, teacher_trained: bool) -> dict[str, float]:
    """FLOPs of NFM's preparation and of one student step, as torch's FlopCounterMode counts them (matmuls,
    convolutions, attention) on a forward pass; a training step counts 3 forward passes (forward + backward).
    Teacher training: 3 F_t x batch x steps (0 for a teacher that was not trained here); pairs: F_t x rows x
    views (one encode each); a student step: 3 F_s x batch."""
    from torch.utils.flop_counter import FlopCounterMode

    from nfm.student.models import build_student
    from nfm.teacher.protocol import teacher_device

    c, h, _ = data.image_shape
    y = torch.zeros(2, dtype=torch.long) if data.num_classes else None

    def forward_flops(fn) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 2

    device = teacher_device(teacher)
    ty = y.to(device) if (y is not None and teacher.num_classes) else None
    f_t = forward_flops(lambda: teacher.encode(torch.zeros(2, c, h, h, device=device), ty))
    model = build_student(cfg.student.model.resolved(c, h, data.num_classes))
    f_s = forward_flops(lambda: model(torch.zeros(2, c, h, h), torch.full((2,), 0.5), y))
    tt = cfg.teacher.train
    return {
        "teacher_forward": f_t,
        "student_forward": f_s,
        "teacher_training": 3 * f_t * tt.batch_size * tt.steps if teacher_trained else 0.0,
        "pairs": f_t * len(data) * cfg.pairs.views,
        "student_step": 3 * f_s * cfg.student.train.batch_size,
    }


def _matched_steps(
    cfg: RunConfig, coupling: str, flops: dict[str, float] | None, students: dict[str, Path], costs: _Costs
) -> dict[str, Any]:
    """Training steps that give a baseline NFM's total compute: the student's steps + NFM's preparation
    (teacher + pairs) in units of one step of this baseline, rounded up to a multiple of 100. Decided once
    per seed and kept in the costs file, so a rerun reuses the same student."""
    known = costs.data.get("matched", {}).get(coupling)
    if known and known.get("by") == cfg.matched_by:
        return known
    steps = cfg.student.train.steps
    if cfg.matched_by == "flops":
        prep = flops["teacher_training"] + flops["pairs"]
        extra, detail = prep / flops["student_step"], {"prep_flops": prep, "step_flops": flops["student_step"]}
    else:
        teacher_s = costs.data.get("teacher", {}).get("seconds")
        pairs_s = costs.data.get("nfm pairs", {}).get("seconds")
        sps = _seconds_per_step(students[coupling].parent) if coupling in students else None
        if teacher_s is None or pairs_s is None or sps is None:
            raise NFMError(
                "matched_by=seconds needs the teacher's and the pairs' training times measured in this run "
                f"directory (costs.json has teacher {teacher_s}, pairs {pairs_s}); use matched_by=flops"
            )
        extra, detail = (teacher_s + pairs_s) / sps, {"prep_seconds": teacher_s + pairs_s, "step_seconds": sps}
    out = {"by": cfg.matched_by, "steps": steps + 100 * math.ceil(extra / 100), "base_steps": steps, **detail}
    costs.data.setdefault("matched", {})[coupling] = out
    costs.record("matched", None)
    return out


def _stage_matched(
    cfg: RunConfig,
    run_dir: Path,
    data_cfg: DataConfig,
    flops: dict[str, float] | None,
    students: dict[str, Path],
    cache_root: Path,
    stages: _Stages,
    costs: _Costs,
    prefix: str = "",
) -> dict[str, Path]:
    """The baselines of `compute_matched`, trained again for NFM's total compute."""
    out = {}
    for coupling in cfg.compute_matched:
        m = _matched_steps(cfg, coupling, flops, students, costs)
        stages.log.info(f"{coupling} at NFM's total compute ({m['by']}): {m['steps']} steps, not {m['base_steps']}")
        longer = replace(cfg, student=replace(cfg.student, train=replace(cfg.student.train, steps=m["steps"])))
        scfg = _student_cfg(longer, coupling, data_cfg, "")
        name = f"{coupling}@matched"
        out[name] = _train_student(scfg, name, coupling, run_dir, cache_root, stages, prefix)
    return out


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
    computed: bool = False  # a result beside the sweeps (guided rows, sampling spread) was computed, not read

    @classmethod
    def make(cls, ev: EvalConfig, data_cfg: DataConfig, train_data: ImageDataset, run_dir: Path, log) -> _EvalContext:
        extractor = ev.extractor or default_extractor(data_cfg.name)
        reference, ref_labels = load_data(data_cfg, "test").tensors()
        if len(train_data) <= 100_000:
            train_images = train_data.tensors()[0]
        else:
            train_images = train_data.__getitems__(list(range(100_000)))[0]
        on = EvalSet(reference, ref_labels, train_images, extractor, ev.n, ev.seed)
        warning = fid_size_warning(extractor, ev.n, len(reference))
        if warning:
            log.warning(f"warning: {warning}")
        # the sampling-spread, floor and guidance settings are not part of a sweep's inputs
        sweep = to_dict(replace(ev, noise_seeds=0, floor_draws=EvalConfig().floor_draws, guidance=(),
                                guidance_nfes=EvalConfig().guidance_nfes))  # fmt: skip
        # samplers: 2 since heun's last step is Euler (issue 25): results cached before are not reused
        key = config_hash({"eval": sweep, "extractor": extractor, "reference": len(reference), "samplers": 2})
        return cls(ev, on, run_dir / "eval", key, log)


def _teacher_prior(pairs: PairBuildResult | None, log) -> tuple[Prior | None, str]:
    """The prior fitted to the teacher's pair cache, scaled into its noise units (x sigma_f), and a tag for file
    names ("" without a cache: a run whose couplings read no pairs)."""
    if pairs is None:
        return None, ""
    cache = PairCache(pairs.path)
    return teacher_prior(cache, log=log), f"-prior{prior_dir(cache, PriorConfig()).name[:8]}"


def _evaluate_teacher(
    ctx: _EvalContext, teacher: Teacher, data_cfg: DataConfig, pairs: PairBuildResult | None
) -> tuple[TeacherEval, bool]:
    ctx.log.info(f"evaluating the teacher ({ctx.ev.n} samples, {ctx.on.extractor})")
    prior, tag = _teacher_prior(pairs, ctx.log.info)

    def compute() -> TeacherEval:
        out = teacher_sweep(teacher, ctx.on, fitted=prior, log=ctx.log.info)
        if callable(getattr(teacher, "log_prob", None)):
            out.test_bpd = evaluate_bpd(teacher, load_data(data_cfg, "test"))
        out.noise_std = teacher.noise_std
        return out

    return _cached(ctx.eval_dir / f"teacher-{teacher.fingerprint()}-{ctx.key}{tag}.json", compute, TeacherEval)


def _evaluate_student(
    ctx: _EvalContext, coupling: str, export: Path, eta: float, device, prior_choice: str = "auto"
) -> tuple[StudentEval, bool]:
    ev, on = ctx.ev, ctx.on
    model, meta, prior, tag = _student_for_eval(export, device, prior_choice)
    ctx.log.info(f"evaluating the {coupling} student (from {'its fitted prior' if prior else 'N(0, I)'})")

    def compute() -> StudentEval:
        out = student_sweep(
            model, meta, on, euler_nfes=ev.euler_nfes, higher=((ev.higher_solver, ev.higher_steps),),
            dopri5=ev.dopri5, dopri5_tol=ev.dopri5_tol, straightness_steps=ev.straightness_steps, prior=prior,
            log=ctx.log.info,
        )  # fmt: skip
        if ev.likelihood:
            from nfm.student.likelihood import student_bpd

            m = ev.likelihood_n or len(on.reference)
            ctx.log.info(f"  bits/dim of the {coupling} student through the ODE ({m} held-out images)")
            bar = progress(m, "bits/dim", "img")
            out.likelihood = student_bpd(
                model, meta, on.reference[:m], on.reference_labels[:m], eta=eta, hutchinson=ev.likelihood_hutchinson,
                solver=ev.likelihood_solver, progress=lambda n: bar.update(n - bar.n), prior=prior,
            )  # fmt: skip
            bar.close()
            ctx.log.info(f"  bits/dim {out.likelihood['bits_per_dim']:.4f} ({out.likelihood['divergence']})")
        return out

    return _cached(ctx.eval_dir / f"student-{_slug(coupling)}-{tag}-{ctx.key}.json", compute, StudentEval)


def _student_for_eval(export: Path, device, prior_choice: str = "auto") -> tuple[Any, dict, Prior | None, str]:
    """(model, meta, the prior it samples from (student_prior's `prior_choice`), a tag naming both for cached
    results: the weights' and the fitted prior's checksums)."""
    model, meta = load_student(export, device)
    prior = student_prior(export, meta, prior_choice)
    tag = sha256_file(export / "model.safetensors")[:16] + (f"-prior{meta['prior']['sha256'][:8]}" if prior else "")
    return model, meta, prior, tag


def _prior_used(export: Path, choice: str) -> str:
    """ "fitted" or "gaussian": what a student evaluated with prior `choice` starts from."""
    recorded = read_json(Path(export) / "config.json", "student config").get("prior")
    return "gaussian" if choice == "gaussian" or not recorded else "fitted"


def _slug(name: str) -> str:
    """A model's name as part of a file name: nfm[eta=0] -> nfm_eta0."""
    return re.sub(r"[^A-Za-z0-9.@-]+", "_", name.replace("=", "")).strip("_")


def _sampling_spread(
    ctx: _EvalContext, name: str, export: Path, base: dict[str, Any], device, prior_choice: str = "auto"
) -> dict[str, Any]:
    """FID of one trained student at each Euler NFE on eval.noise_seeds more noise seeds (eval.seed + j), with
    the main sweep's value: the spread that sampling noise alone gives at this sample count. Cached."""
    ev = ctx.ev
    model, meta, prior, tag = _student_for_eval(export, device, prior_choice)
    path = ctx.eval_dir / f"spread-{_slug(name)}-{tag}-{ctx.key}-{ev.noise_seeds}.json"
    if path.is_file():
        return read_json(path, "sampling spread")
    ctx.log.info(f"FID sampling spread of the {name} student ({ev.noise_seeds} more noise seeds)")
    ctx.computed = True
    fids = {r["nfe"]: [r["fid"]] for r in base["rows"] if r["solver"] == "euler"}
    for j in range(1, ev.noise_seeds + 1):
        on = replace(ctx.on, seed=ev.seed + j)
        sweep = student_sweep(
            model, meta, on, euler_nfes=ev.euler_nfes, higher=(), dopri5=False, straightness_steps=1, prior=prior,
            log=ctx.log.info,
        )  # fmt: skip
        for r in sweep.rows:
            fids[r.nfe].append(r.fid)
    out = {"noise_seeds": [ev.seed + j for j in range(ev.noise_seeds + 1)], "euler": {}}
    for nfe, values in fids.items():
        out["euler"][str(nfe)] = spread(values)
    write_json(path, out)
    return out


def _guided(ctx: _EvalContext, name: str, tag: str, compute: Callable[[], dict]) -> dict:
    """Guided rows of one model (evaluate.student_guidance / teacher_guidance), cached beside its sweep."""
    ev = ctx.ev
    gkey = config_hash({"weights": list(ev.guidance), "nfes": list(ev.guidance_nfes)})
    path = ctx.eval_dir / f"guided-{_slug(name)}-{tag}-{ctx.key}-{gkey}.json"
    if path.is_file():
        return read_json(path, "guided evaluation")
    ctx.log.info(f"classifier-free guidance of the {name} (weights 0, {', '.join(map(str, ev.guidance))})")
    ctx.computed = True
    out = compute()
    write_json(path, out)
    return out


def _guidance_rows(ctx: _EvalContext, run: _SeedRun, device) -> dict[str, dict]:
    """{model: {sampler: choice}} for the teacher and every class-conditional student of one seed."""
    from nfm.pipeline.evaluate import student_guidance, teacher_guidance

    ev, on, out = ctx.ev, ctx.on, {}
    if ctx.ev.teacher and run.teacher is not None and run.teacher.num_classes:
        prior, tag = _teacher_prior(run.pairs, ctx.log.info)
        compute = partial(teacher_guidance, run.teacher, on, ev.guidance, fitted=prior, log=ctx.log.info)
        out["teacher"] = _guided(ctx, "teacher", run.teacher.fingerprint() + tag, compute)
    for name, export in run.evaluated.items():
        model, meta, prior, tag = _student_for_eval(export, device, run.priors.get(name, "auto"))
        if not meta["model"]["num_classes"]:
            continue
        compute = partial(student_guidance, model, meta, on, ev.guidance, ev.guidance_nfes, prior=prior,
                          log=ctx.log.info)  # fmt: skip
        out[name] = _guided(ctx, name, tag, compute)
    return out


def _floor(ctx: _EvalContext) -> dict[str, Any]:
    """What a model that reproduces the held-out set exactly scores at this sample count: n held-out images
    drawn with replacement, scored against the held-out set, floor_draws times (FID's finite-sample floor)."""
    ev, on = ctx.ev, ctx.on
    fids, kids = [], []
    for b in range(ev.floor_draws):
        g = torch.Generator().manual_seed(derive_seed(ev.seed, "floor", b))
        scores = on.fid_kid(on.reference[torch.randint(len(on.reference), (ev.n,), generator=g)])
        fids.append(scores["fid"])
        kids.append(scores["kid"])
    return {"draws": ev.floor_draws, "n": ev.n, "fid": spread(fids), "kid": spread(kids)}


def _evaluate_seed(
    ctx: _EvalContext, run: _SeedRun, device, grids: bool
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]], bool]:
    """FID/KID of one seed's teacher and students: (results, grids (when asked), all reused)."""
    results: dict[str, Any] = {"teacher": None, "students": {}}
    out_grids: dict[str, dict[str, torch.Tensor]] = {}
    reused_all = True
    if ctx.ev.teacher and run.teacher is not None:
        res, reused = _evaluate_teacher(ctx, run.teacher, run.data_cfg, run.pairs)
        results["teacher"], reused_all = res.to_json(), reused_all and reused
        if grids:
            out_grids["teacher"] = res.grids
    eta = run.teacher.noise_std if run.teacher else 0.0
    for name, export in run.evaluated.items():
        res, reused = _evaluate_student(ctx, name, export, eta, device, run.priors.get(name, "auto"))
        results["students"][name], reused_all = res.to_json(), reused_all and reused
        if not grids:
            continue
        out_grids[name] = res.euler_grids(8)
        meta = read_json(Path(export) / "config.json", "student config")
        if meta["flow"].get("source", "gaussian") != "gaussian":  # the grids show (source, sample) pairs
            from nfm.student.sampling import student_inputs

            out_grids[name]["source"] = student_inputs(meta, min(ctx.ev.n, 100), seed=ctx.on.seed).eps
    if ctx.ev.guidance:
        results["guided"] = _guidance_rows(ctx, run, device)
    return results, out_grids, reused_all


def _stage_evaluation(
    cfg: RunConfig, ctx: _EvalContext, runs: list[_SeedRun], device, stages: _Stages
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Stage 4 (main process): every seed's teacher and students; results averaged over the seeds with 95 %
    intervals (`per_seed` keeps each seed's), FID's sampling spread, the floor; seed 0's grids."""
    t0, ev, on = time.perf_counter(), ctx.ev, ctx.on
    per_seed, grids, reused_all = [], {}, True
    for k, run in enumerate(runs):
        res, g, reused = _evaluate_seed(ctx, run, device, grids=k == 0)
        per_seed.append(res)
        grids, reused_all = grids or g, reused_all and reused
    floor_n = min(len(on.train_images), max(ev.n, len(on.reference)))
    names = list(runs[0].evaluated)
    results: dict[str, Any] = {
        "n": ev.n,
        "seed": ev.seed,
        "seeds": len(runs),
        "extractor": on.extractor,
        "reference": len(on.reference),
        "students": {
            name: aggregate_student([ps["students"][name] for ps in per_seed if name in ps["students"]])
            for name in names
        },
        "teacher": None,
        "floor": _floor(ctx),
        "data_floor": on.fid_kid(on.train_images[:floor_n]),
        "straightness_steps": ev.straightness_steps,
        "fid_warning": fid_size_warning(on.extractor, ev.n, len(on.reference)),
        "priors": {name: _prior_used(e, runs[0].priors.get(name, "auto")) for name, e in runs[0].evaluated.items()},
        "knobs": [knob_name(k) for k in cfg.knobs],
        "knob_settings": {knob_name(k): k for k in cfg.knobs},
    }
    teachers = [ps["teacher"] for ps in per_seed if ps["teacher"] is not None]
    if teachers:
        results["teacher"] = aggregate_teacher(teachers)
    if ev.noise_seeds:
        results["sampling_spread"] = {
            name: _sampling_spread(
                ctx,
                name,
                runs[0].evaluated[name],
                per_seed[0]["students"][name],
                device,
                runs[0].priors.get(name, "auto"),
            )  # fmt: skip
            for name in names
            if name not in results["knobs"]
        }
    if ev.guidance:
        results["guidance"] = _aggregate_guidance(ev, per_seed, len(on.reference))
    results["per_seed"] = per_seed
    stages.done("evaluation", reused_all and not ctx.computed, t0)
    return results, grids


def _aggregate_guidance(ev: EvalConfig, per_seed: list[dict[str, Any]], reference: int) -> dict[str, Any]:
    """The guided rows over the seeds: per model and sampler, the test-half FID unguided and guided (mean and
    interval) and the weight each seed chose."""
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for model, samplers in per_seed[0]["guided"].items():
        for sampler in samplers:
            seeds = [ps["guided"][model][sampler] for ps in per_seed if sampler in ps["guided"].get(model, {})]
            row = {"best": [c["best"] for c in seeds]}
            for k in ("unguided", "guided"):
                row[k], row[f"{k}_ci"] = interval([c[k] for c in seeds])
                row[f"{k}_seeds"] = [c[k] for c in seeds]
            rows.setdefault(model, {})[sampler] = row
    return {"weights": [0.0, *ev.guidance], "nfes": list(ev.guidance_nfes), "halves": [reference // 2,
            reference - reference // 2], "rows": rows}  # fmt: skip


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
    for coupling in cfg.couplings + tuple(f"{c}@matched" for c in cfg.compute_matched):
        parts: dict[str, float | None] = {p: costs.data.get(p, {}).get("seconds") for p in prep.get(coupling, [])}
        if coupling in REFLOW_FROM:  # the source student's training is part of a reflow coupling's cost
            sps = _seconds_per_step(students[REFLOW_FROM[coupling]].parent)
            parts[f"{REFLOW_FROM[coupling]} student"] = None if sps is None else round(sps * steps, 1)
        out[coupling] = {
            "seconds_per_step": _seconds_per_step(students[coupling].parent),
            "prep": parts,
            "prep_seconds": None if None in parts.values() else round(sum(parts.values()), 1),
        }
        if coupling.startswith("sd-ot") and "sd-ot fit" in costs.data:
            out[coupling]["prep"] = {"sd-ot fit": costs.data["sd-ot fit"]["seconds"]}
            out[coupling]["prep_seconds"] = costs.data["sd-ot fit"]["seconds"]
            out[coupling]["sdot_shares"] = costs.data["sd-ot fit"]["shares"]
        if coupling.endswith("@matched"):
            out[coupling]["steps"] = costs.data["matched"][coupling.removesuffix("@matched")]["steps"]
    return out


def needs_teacher(cfg: RunConfig) -> bool:
    """A teacher is trained (or loaded) when a coupling reads its pairs or the report evaluates it."""
    return cfg.eval.teacher or any(c in ("nfm", "nfm-reflow") for c in cfg.couplings)


def check_run(cfg: RunConfig) -> None:
    """Refuse a run config that cannot work, before the first stage starts."""
    check_choices(cfg)
    if not cfg.couplings:
        raise NFMError("couplings must name at least one coupling")
    for knob in cfg.knobs:
        knob_config(cfg, knob)
    if cfg.knobs and "nfm" not in cfg.couplings:
        raise NFMError("knobs are variants of the nfm student: add nfm to couplings")
    for c in cfg.compute_matched:
        if c not in MATCHABLE or c not in cfg.couplings:
            raise NFMError(
                f"compute_matched={c}: name baselines of this run's couplings ({', '.join(MATCHABLE)}) to train "
                "again for NFM's total compute"
            )
    if cfg.compute_matched and "nfm" not in cfg.couplings:
        raise NFMError("compute_matched gives baselines NFM's total compute: add nfm to couplings")


@dataclass
class _SeedRun:
    """What one training seed produced."""

    cfg: RunConfig
    teacher: Teacher | None
    data_cfg: DataConfig
    train_data: ImageDataset
    pairs: PairBuildResult | None
    trained: dict[str, Path]  # every student trained (with the sources of reflow couplings)
    evaluated: dict[str, Path]  # couplings, compute-matched baselines, knob variants
    priors: dict[str, str]  # the prior each evaluated student is sampled from, where not its own (student_prior)
    costs: _Costs


def _train_seed(
    cfg: RunConfig,
    k: int,
    run_dir: Path,
    from_teacher: str | None,
    teacher_arch: str | None,
    cache_root: Path,
    stages: _Stages,
) -> _SeedRun:
    """Teacher, pairs and every student of training seed k (cfg: seeded(run config, k))."""
    state, log = process_state(), stages.log
    prefix = f"seed {k}: " if cfg.seeds > 1 else ""
    if prefix:
        log.info(f"training seed {k} of {cfg.seeds}")
    costs = _Costs(run_dir, state.is_main_process, k)
    teacher, teacher_info, pairs, data_cfg = None, {}, None, cfg.teacher.data
    if needs_teacher(cfg):
        teacher, teacher_info, data_cfg = _stage_teacher(
            cfg, run_dir, from_teacher, teacher_arch, state.device, stages, prefix
        )  # fmt: skip
        if from_teacher and k == 0:  # its data is known now: check the evaluation's feature network
            check_extractor(cfg.eval.extractor or default_extractor(data_cfg.name))
        if stages.timings and not stages.timings[-1]["reused"]:
            costs.record("teacher", stages.timings[-1]["seconds"])
        t0 = time.perf_counter()
        train_data = load_data(data_cfg, cfg.pairs.split)
        pairs = build_pairs(teacher, train_data, cfg.pairs, cache_root, log=log.info, teacher_info=teacher_info)
        stages.done(f"{prefix}pairs", pairs.hit, t0)
        if not pairs.hit:
            costs.record("nfm pairs", time.perf_counter() - t0, pairs=pairs.total_rows)
    else:
        log.info(f"no teacher: the couplings {', '.join(cfg.couplings)} do not use one (eval.teacher=false)")
        train_data = load_data(data_cfg, cfg.pairs.split)
    trained = _stage_students(cfg, run_dir, data_cfg, pairs, cache_root, stages, costs, prefix)
    evaluated = {c: trained[c] for c in cfg.couplings}
    if cfg.compute_matched:
        flops = budget_flops(cfg, teacher, train_data, not from_teacher) if cfg.matched_by == "flops" else None
        matched = _stage_matched(cfg, run_dir, data_cfg, flops, trained, cache_root, stages, costs, prefix)
        trained.update(matched)
        evaluated.update(matched)
    priors: dict[str, str] = {}
    if cfg.knobs and k < cfg.knob_seeds:
        knobs, priors = _stage_knobs(
            cfg, run_dir, teacher, teacher_info, train_data, data_cfg, cache_root, stages, trained["nfm"], prefix
        )  # fmt: skip
        trained.update(knobs)
        evaluated.update(knobs)
    return _SeedRun(cfg, teacher, data_cfg, train_data, pairs, trained, evaluated, priors, costs)


def _check_pair_space(cfg: RunConfig, run_dir: Path, cache_root: Path) -> None:
    """Before the first stage: room under the cache root for the pair cache of every seed whose teacher is
    not trained yet (where a teacher exists, nothing is lost by the pair build's own check)."""
    from nfm.pairs.build import estimate_cache_bytes

    fresh = [k for k in range(cfg.seeds) if not (run_dir / f"teacher-{config_hash(seeded(cfg, k).teacher)}" / "export"
             / "config.json").is_file()]  # fmt: skip
    if not fresh:
        return
    per_cache = estimate_cache_bytes(load_data(cfg.teacher.data, cfg.pairs.split), cfg.pairs)
    check_free_space(
        cache_root,
        per_cache * len(fresh),
        f"the NFM pair cache{'s' if len(fresh) > 1 else ''} of {len(fresh)} seed{'s' if len(fresh) > 1 else ''}",
        "free space there, or put the caches elsewhere (--cache-dir, or NFM_CACHE_DIR)",
    )


def run_pipeline(
    cfg: RunConfig,
    run_dir: Path,
    preset: str = "custom",
    from_teacher: str | None = None,
    cache_root: Path | None = None,
    teacher_arch: str | None = None,
) -> Path | None:
    """Run (or resume, or reuse) every stage for every training seed; returns the report path (None on
    non-main processes)."""
    run_dir = Path(run_dir)
    check_run(cfg)
    state = process_state()
    log = setup_logger(run_dir, name="nfm.run", main=state.is_main_process)
    log.info(format_table(cfg, f"nfm run --preset {preset} -> {run_dir}"))
    if state.is_main_process:
        write_json(run_dir / "config.json", {"preset": preset, "from_teacher": from_teacher, **to_dict(cfg)})
    cache_root = Path(cache_root or default_cache_root())
    if not from_teacher:  # the evaluation's feature network, checked before hours of training
        check_extractor(cfg.eval.extractor or default_extractor(cfg.teacher.data.name))
        if state.is_main_process and needs_teacher(cfg) and cfg.pairs.check_space:
            _check_pair_space(cfg, run_dir, cache_root)
    stages, t_all = _Stages(log), time.perf_counter()
    runs = [
        _train_seed(seeded(cfg, k), k, run_dir, from_teacher, teacher_arch, cache_root, stages)
        for k in range(cfg.seeds)
    ]
    if not state.is_main_process:
        return None

    ctx = _EvalContext.make(cfg.eval, runs[0].data_cfg, runs[0].train_data, run_dir, log)
    results, grids = _stage_evaluation(cfg, ctx, runs, state.device, stages)
    results = {"preset": preset, **results}
    results["timings"] = stages.timings
    results["total_seconds"] = round(time.perf_counter() - t_all, 1)
    results["peak_rss_mb"] = _peak_rss_mb()
    results["costs"] = _coupling_costs(cfg, runs[0].trained, runs[0].costs)
    results["student_steps"] = cfg.student.train.steps
    if "matched" in runs[0].costs.data:
        results["matched"] = runs[0].costs.data["matched"]
    if runs[0].pairs is not None:
        pairs = runs[0].pairs
        results["pair_cache"] = {"key": pairs.key, "path": str(pairs.path), "index": str(pairs.path / INDEX_NAME)}
    from nfm.core.sampling import sample_labels
    from nfm.pipeline.report import write_report

    # the labels of the grids' samples: every model sampled the same fixed inputs (student_inputs)
    labels = sample_labels(min(ctx.ev.n, 100), runs[0].train_data.num_classes, None, ctx.on.reference_labels)
    report = write_report(results, grids, run_dir, labels=labels)
    log.info(f"report: {report}")
    return report
