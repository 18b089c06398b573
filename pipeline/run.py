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
import resource
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from pairs.build import PairBuildConfig, build_pairs, default_cache_root
from pairs.format import INDEX_NAME, sha256_file
from pipeline.config import format_table, from_dict, to_dict
from pipeline.data import DataConfig, load_data
from pipeline.errors import NFMError
from pipeline.io import load_tensors, read_json, save_tensors, write_json
from pipeline.training import process_state, setup_logger
from student.couplings import COUPLINGS
from student.train import StudentRunConfig, load_student, run_student_training
from teacher.protocol import load_teacher_spec
from teacher.train import TeacherRunConfig, evaluate_bpd, run_teacher_training


@dataclass(frozen=True)
class EvalConfig:
    n: int = 1000  # samples per evaluation (fixed noise, labels with the held-out class histogram)
    seed: int = 2024
    extractor: str = ""  # "" = nfm-DATA for built-in data, else inception-v3-fid-helper
    euler_nfes: tuple[int, ...] = (1, 2, 4, 8)
    higher_solver: str = "heun"  # a higher-order solver at a moderate NFE ...
    higher_steps: int = 4  # ... (heun, 4 steps = NFE 8)
    dopri5: bool = True  # adaptive, NFE measured
    straightness_steps: int = 32
    teacher: bool = True  # evaluate the teacher's samples too
    # the students' bits/dim through the ODE on held-out x + eta * eps (eta: the teacher's); slow on a CPU
    likelihood: bool = False
    likelihood_n: int = 0  # held-out images (0: all)
    likelihood_solver: str = "dopri5"
    likelihood_hutchinson: int = -1  # probes; -1: exact divergence up to 1,024 dimensions, 8 probes above


@dataclass(frozen=True)
class RunConfig:
    teacher: TeacherRunConfig = field(default_factory=TeacherRunConfig)
    pairs: PairBuildConfig = field(default_factory=PairBuildConfig)
    student: StudentRunConfig = field(default_factory=StudentRunConfig)
    couplings: tuple[str, ...] = ("nfm", "independent", "minibatch-ot")
    eval: EvalConfig = field(default_factory=EvalConfig)


def config_hash(obj: Any) -> str:
    d = to_dict(obj) if hasattr(obj, "__dataclass_fields__") else obj
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cached_eval(path: Path, compute) -> tuple[dict[str, Any], dict[str, torch.Tensor], bool]:
    """A sweep result cached as JSON (+ its grids as safetensors); computed once per input hash."""
    grids_path = path.with_suffix(".safetensors")
    if path.is_file() and grids_path.is_file():
        return read_json(path, "evaluation"), load_tensors(grids_path, "evaluation grids"), True
    result = compute()
    grids = {k: v[:100].contiguous() for k, v in result.pop("_grids").items()}
    save_tensors(grids_path, grids)
    write_json(path, result)
    return result, grids, False


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
    state = process_state()
    log = setup_logger(run_dir, name="nfm.run", main=state.is_main_process)
    unknown = [c for c in cfg.couplings if c not in COUPLINGS]
    if unknown or not cfg.couplings:
        raise NFMError(f"couplings must be a non-empty subset of {', '.join(COUPLINGS)}; got {list(cfg.couplings)}")
    log.info(format_table(cfg, f"nfm run --preset {preset} -> {run_dir}"))
    if state.is_main_process:
        write_json(run_dir / "config.json", {"preset": preset, "from_teacher": from_teacher, **to_dict(cfg)})
    cache_root = Path(cache_root or default_cache_root())
    timings: list[dict[str, Any]] = []
    t_all = time.perf_counter()

    def stage(name: str, reused: bool, t0: float) -> None:
        timings.append({"stage": name, "seconds": round(time.perf_counter() - t0, 1), "reused": reused})
        log.info(f"[{name}] {'reused' if reused else 'done'} in {timings[-1]['seconds']:.1f}s")

    # 1. teacher
    t0 = time.perf_counter()
    if from_teacher:  # an export, ml-tarflow:PATH or python:module:factory; data: its own, else the preset's
        teacher, teacher_info = load_teacher_spec(from_teacher, state.device, teacher_arch)
        data_cfg = from_dict(DataConfig, teacher_info["data"]) if teacher_info.get("data") else cfg.teacher.data
        stage("teacher (--from-teacher)", True, t0)
    else:
        tdir = run_dir / f"teacher-{config_hash(cfg.teacher)}"
        reused = (tdir / "export" / "config.json").is_file()
        export = run_teacher_training(cfg.teacher, tdir)
        data_cfg = cfg.teacher.data
        teacher, teacher_info = load_teacher_spec(str(export), state.device)
        stage("teacher", reused, t0)

    # 2. pairs
    t0 = time.perf_counter()
    train_data = load_data(data_cfg, cfg.pairs.split)
    said: list[str] = []
    cache_dir = build_pairs(
        teacher,
        train_data,
        cfg.pairs,
        cache_root,
        log=lambda m: (said.append(m), log.info(m)),
        teacher_info=teacher_info,
    )
    stage("pairs", any("cache hit" in m for m in said), t0)

    # 3. students: the same network, steps and batch for every coupling
    students: dict[str, Path] = {}
    for coupling in cfg.couplings:
        t0 = time.perf_counter()
        scfg = replace(
            cfg.student,
            data=data_cfg,
            flow=replace(
                cfg.student.flow, coupling=coupling, pairs=str(cache_dir.resolve()) if coupling == "nfm" else ""
            ),
        )
        sdir = run_dir / "students" / f"{coupling}-{config_hash(scfg)}"
        reused = (sdir / "export" / "config.json").is_file()
        students[coupling] = run_student_training(scfg, sdir, cache_root)
        stage(f"student {coupling}", reused, t0)

    if not state.is_main_process:
        return None

    # 4. evaluation (main process)
    from pipeline.evaluate import default_extractor, fid_kid, student_sweep, teacher_sweep

    ev = cfg.eval
    extractor = ev.extractor or default_extractor(data_cfg.name)
    reference, ref_labels = load_data(data_cfg, "test").tensors()
    train_images, _ = (
        train_data.tensors() if len(train_data) <= 100_000 else train_data.__getitems__(list(range(100_000)))
    )
    results: dict[str, Any] = {
        "preset": preset,
        "n": ev.n,
        "seed": ev.seed,
        "extractor": extractor,
        "reference": len(reference),
        "students": {},
        "teacher": None,
    }
    grids: dict[str, dict[str, torch.Tensor]] = {}
    t0 = time.perf_counter()
    floor_n = min(len(train_images), max(ev.n, len(reference)))
    results["data_floor"] = fid_kid(train_images[:floor_n], reference, extractor)
    eval_dir = run_dir / "eval"
    eval_key = config_hash({"eval": asdict(ev), "extractor": extractor, "reference": len(reference)})
    reused_all = True
    if ev.teacher:
        log.info(f"evaluating the teacher ({ev.n} samples, {extractor})")
        fp = teacher.fingerprint()

        def teacher_eval():
            out = teacher_sweep(
                teacher, reference, ref_labels, train_images, n=ev.n, seed=ev.seed, extractor=extractor, log=log.info
            )
            if callable(getattr(teacher, "log_prob", None)):
                out["test_bpd"] = evaluate_bpd(teacher, load_data(data_cfg, "test"))
            out["noise_std"] = teacher.noise_std
            return out

        res, g, reused = _cached_eval(eval_dir / f"teacher-{fp}-{eval_key}.json", teacher_eval)
        results["teacher"], grids["teacher"], reused_all = res, g, reused_all and reused

    def evaluate_student(coupling: str, model, meta) -> dict[str, Any]:
        out = student_sweep(
            model,
            meta,
            reference,
            ref_labels,
            train_images,
            n=ev.n,
            seed=ev.seed,
            extractor=extractor,
            euler_nfes=ev.euler_nfes,
            higher=((ev.higher_solver, ev.higher_steps),),
            dopri5=ev.dopri5,
            straightness_steps=ev.straightness_steps,
            log=log.info,
        )
        if ev.likelihood:
            from student.likelihood import student_bpd

            m = ev.likelihood_n or len(reference)
            log.info(f"  bits/dim of the {coupling} student through the ODE ({m} held-out images)")
            out["likelihood"] = lk = student_bpd(
                model,
                meta,
                reference[:m],
                ref_labels[:m],
                eta=teacher.noise_std,
                hutchinson=ev.likelihood_hutchinson,
                solver=ev.likelihood_solver,
            )
            log.info(f"  bits/dim {lk['bits_per_dim']:.4f} ({lk['divergence']})")
        return out

    for coupling, sexport in students.items():
        log.info(f"evaluating the {coupling} student")
        model, meta = load_student(sexport, state.device)
        fp = sha256_file(sexport / "model.safetensors")[:16]
        res, g, reused = _cached_eval(
            eval_dir / f"student-{coupling}-{fp}-{eval_key}.json",
            lambda coupling=coupling, model=model, meta=meta: evaluate_student(coupling, model, meta),
        )
        results["students"][coupling] = res
        grids[coupling] = {k: v for k, v in g.items() if k.startswith("euler-") and int(k.split("-")[1]) <= 8}
        reused_all = reused_all and reused
    stage("evaluation", reused_all, t0)

    # 5. report
    results["timings"] = timings
    results["total_seconds"] = round(time.perf_counter() - t_all, 1)
    results["peak_rss_mb"] = _peak_rss_mb()
    results["pair_cache"] = {"key": cache_dir.name, "path": str(cache_dir), "index": str(cache_dir / INDEX_NAME)}
    from pipeline.report import write_report

    report = write_report(results, grids, run_dir)
    log.info(f"report: {report}")
    return report
