"""Stage 4 of `nfm run` (main process): FID/KID sweeps of every seed's teacher and students on the same noise,
each cached under a hash of its inputs (RUN/eval/NAME-HASH.json + the sample grids), guided rows, FID's sampling
spread and finite-sample floor; the results averaged over the seeds with 95 % intervals."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from nfm.core.config import config_hash, to_dict
from nfm.core.data import ImageDataset
from nfm.core.io import load_tensors, read_json, save_tensors, sha256_file, write_json
from nfm.core.prior import Prior
from nfm.core.rundir import progress
from nfm.core.seeding import derive_seed
from nfm.pairs.build import PairBuildResult
from nfm.pairs.prior import PriorConfig, prior_dir, teacher_prior
from nfm.pairs.reader import PairCache
from nfm.pipeline.aggregate import aggregate_seeds, interval, spread
from nfm.pipeline.evaluate import (
    EvalSet,
    StudentEval,
    TeacherEval,
    default_extractor,
    fid_size_warning,
    student_sweep,
    teacher_sweep,
)
from nfm.pipeline.results import RunResults
from nfm.pipeline.run.config import EvalConfig, RunConfig, crossed, knob_name
from nfm.pipeline.run.context import RunContext, SeedRun, Stages
from nfm.student.train import load_student, student_prior
from nfm.teacher.protocol import Teacher
from nfm.teacher.train import evaluate_bpd


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
class EvalContext:
    """What every evaluation of one run shares: the settings, the evaluation set, the cache of results."""

    ev: EvalConfig
    on: EvalSet
    test: ImageDataset  # the held-out split: the FID reference, the teacher's bits/dim
    eval_dir: Path
    key: str  # hash of the evaluation settings: part of every cached result's name
    log: logging.Logger
    device: Any
    computed: bool = False  # a result beside the sweeps (guided rows, sampling spread) was computed, not read

    @classmethod
    def make(cls, ev: EvalConfig, run: RunContext, seed0: SeedRun) -> EvalContext:
        """The evaluation set of a run: the held-out split of seed 0's data, the first 100,000 training images."""
        extractor = ev.extractor or default_extractor(seed0.seed.data_cfg.name)
        test = run.data(seed0.seed.data_cfg, "test")
        train_data = seed0.seed.train_data()
        reference, ref_labels = test.tensors()
        if len(train_data) <= 100_000:
            train_images = train_data.tensors()[0]
        else:
            train_images = train_data.__getitems__(list(range(100_000)))[0]
        on = EvalSet(reference, ref_labels, train_images, extractor, ev.n, ev.seed)
        warning = fid_size_warning(extractor, ev.n, len(reference))
        if warning:
            run.log.warning(f"warning: {warning}")
        # the sampling-spread, floor and guidance settings are not part of a sweep's inputs
        sweep = to_dict(replace(ev, noise_seeds=0, floor_draws=EvalConfig().floor_draws, guidance=(),
                                guidance_nfes=EvalConfig().guidance_nfes))  # fmt: skip
        # samplers: 2 since heun's last step is Euler (issue 25): results cached before are not reused
        key = config_hash({"eval": sweep, "extractor": extractor, "reference": len(reference), "samplers": 2})
        return cls(ev, on, test, run.run_dir / "eval", key, run.log, run.device)


def _teacher_prior(pairs: PairBuildResult | None, log) -> tuple[Prior | None, str]:
    """The prior fitted to the teacher's pair cache, scaled into its noise units (x sigma_f), and a tag for file
    names ("" without a cache: a run whose couplings read no pairs)."""
    if pairs is None:
        return None, ""
    cache = PairCache(pairs.path)
    return teacher_prior(cache, log=log), f"-prior{prior_dir(cache, PriorConfig()).name[:8]}"


def _evaluate_teacher(ctx: EvalContext, teacher: Teacher, pairs: PairBuildResult | None) -> tuple[TeacherEval, bool]:
    ctx.log.info(f"evaluating the teacher ({ctx.ev.n} samples, {ctx.on.extractor})")
    prior, tag = _teacher_prior(pairs, ctx.log.info)

    def compute() -> TeacherEval:
        out = teacher_sweep(teacher, ctx.on, fitted=prior, log=ctx.log.info)
        if callable(getattr(teacher, "log_prob", None)):
            out.test_bpd = evaluate_bpd(teacher, ctx.test)
        out.noise_std = teacher.noise_std
        return out

    return _cached(ctx.eval_dir / f"teacher-{teacher.fingerprint()}-{ctx.key}{tag}.json", compute, TeacherEval)


def _evaluate_student(
    ctx: EvalContext, coupling: str, export: Path, eta: float, prior_choice: str = "auto"
) -> tuple[StudentEval, bool]:
    ev, on = ctx.ev, ctx.on
    model, meta, prior, tag = _student_for_eval(export, ctx.device, prior_choice)
    ctx.log.info(f"evaluating the {coupling} student (from {'its fitted prior' if prior else 'N(0, I)'})")

    def compute() -> StudentEval:
        out = student_sweep(
            model, meta, on, euler_nfes=ev.euler_nfes, higher=((ev.higher_solver, ev.higher_steps),),
            dopri5=ev.dopri5, dopri5_tol=ev.dopri5_tol, straightness_steps=ev.straightness_steps, prior=prior,
            mean_nfes=ev.mean_nfes, log=ctx.log.info,
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

    return _cached(ctx.eval_dir / f"student-{slug(coupling)}-{tag}-{ctx.key}.json", compute, StudentEval)


def _student_for_eval(export: Path, device, prior_choice: str = "auto") -> tuple[Any, dict, Prior | None, str]:
    """(model, meta, the prior it samples from (student_prior's `prior_choice`), a tag naming both for cached
    results: the weights' and the fitted prior's checksums)."""
    model, meta = load_student(export, device)
    prior = student_prior(export, meta, prior_choice)
    tag = sha256_file(export / "model.safetensors")[:16] + (f"-prior{meta['prior']['sha256'][:8]}" if prior else "")
    return model, meta, prior, tag


def prior_used(export: Path, choice: str) -> str:
    """ "fitted" or "gaussian": what a student evaluated with prior `choice` starts from."""
    recorded = read_json(Path(export) / "config.json", "student config").get("prior")
    return "gaussian" if choice == "gaussian" or not recorded else "fitted"


def slug(name: str) -> str:
    """A model's name as part of a file name: nfm[eta=0] -> nfm_eta0."""
    return re.sub(r"[^A-Za-z0-9.@-]+", "_", name.replace("=", "")).strip("_")


def _sampling_spread(
    ctx: EvalContext, name: str, export: Path, base: dict[str, Any], prior_choice: str = "auto"
) -> dict[str, Any]:
    """FID of one trained student at each Euler NFE on eval.noise_seeds more noise seeds (eval.seed + j), with
    the main sweep's value: the spread that sampling noise alone gives at this sample count. Cached."""
    ev = ctx.ev
    model, meta, prior, tag = _student_for_eval(export, ctx.device, prior_choice)
    path = ctx.eval_dir / f"spread-{slug(name)}-{tag}-{ctx.key}-{ev.noise_seeds}.json"
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


def _guided(ctx: EvalContext, name: str, tag: str, compute: Callable[[], dict]) -> dict:
    """Guided rows of one model (evaluate.student_guidance / teacher_guidance), cached beside its sweep."""
    ev = ctx.ev
    gkey = config_hash({"weights": list(ev.guidance), "nfes": list(ev.guidance_nfes)})
    path = ctx.eval_dir / f"guided-{slug(name)}-{tag}-{ctx.key}-{gkey}.json"
    if path.is_file():
        return read_json(path, "guided evaluation")
    ctx.log.info(f"classifier-free guidance of the {name} (weights 0, {', '.join(map(str, ev.guidance))})")
    ctx.computed = True
    out = compute()
    write_json(path, out)
    return out


def _guidance_rows(ctx: EvalContext, run: SeedRun) -> dict[str, dict]:
    """{model: {sampler: choice}} for the teacher and every class-conditional student of one seed."""
    from nfm.pipeline.evaluate import student_guidance, teacher_guidance

    ev, on, out = ctx.ev, ctx.on, {}
    if ctx.ev.teacher and run.teacher is not None and run.teacher.num_classes:
        prior, tag = _teacher_prior(run.pairs, ctx.log.info)
        compute = partial(teacher_guidance, run.teacher, on, ev.guidance, fitted=prior, log=ctx.log.info)
        out["teacher"] = _guided(ctx, "teacher", run.teacher.fingerprint() + tag, compute)
    for name, export in run.evaluated.items():
        model, meta, prior, tag = _student_for_eval(export, ctx.device, run.priors.get(name, "auto"))
        if not meta["model"]["num_classes"]:
            continue
        compute = partial(student_guidance, model, meta, on, ev.guidance, ev.guidance_nfes, prior=prior,
                          log=ctx.log.info)  # fmt: skip
        out[name] = _guided(ctx, name, tag, compute)
    return out


def _floor(ctx: EvalContext) -> dict[str, Any]:
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
    ctx: EvalContext, run: SeedRun, grids: bool
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]], bool]:
    """FID/KID of one seed's teacher and students: (results, grids (when asked), all reused)."""
    results: dict[str, Any] = {"teacher": None, "students": {}}
    out_grids: dict[str, dict[str, torch.Tensor]] = {}
    reused_all = True
    if ctx.ev.teacher and run.teacher is not None:
        res, reused = _evaluate_teacher(ctx, run.teacher, run.pairs)
        results["teacher"], reused_all = res.to_json(), reused_all and reused
        if grids:
            out_grids["teacher"] = res.grids
    eta = run.teacher.noise_std if run.teacher else 0.0
    for name, export in run.evaluated.items():
        res, reused = _evaluate_student(ctx, name, export, eta, run.priors.get(name, "auto"))
        results["students"][name], reused_all = res.to_json(), reused_all and reused
        if not grids:
            continue
        out_grids[name] = res.euler_grids(8)
        meta = read_json(Path(export) / "config.json", "student config")
        if meta["flow"].get("source", "gaussian") != "gaussian":  # the grids show (source, sample) pairs
            from nfm.student.sampling import student_inputs

            out_grids[name]["source"] = student_inputs(meta, min(ctx.ev.n, 100), seed=ctx.on.seed).eps
    if ctx.ev.guidance:
        results["guided"] = _guidance_rows(ctx, run)
    return results, out_grids, reused_all


def stage_evaluation(
    cfg: RunConfig, ctx: EvalContext, runs: list[SeedRun], stages: Stages, preset: str
) -> tuple[RunResults, dict[str, dict[str, torch.Tensor]]]:
    """Stage 4 (main process): every seed's teacher and students; results averaged over the seeds with 95 %
    intervals (`per_seed` keeps each seed's), FID's sampling spread, the floor; seed 0's grids."""
    t0, ev, on = time.perf_counter(), ctx.ev, ctx.on
    per_seed, grids, reused_all = [], {}, True
    for k, run in enumerate(runs):
        res, g, reused = _evaluate_seed(ctx, run, grids=k == 0)
        per_seed.append({"seed": run.seed.k, **res})
        grids, reused_all = grids or g, reused_all and reused
    floor_n = min(len(on.train_images), max(ev.n, len(on.reference)))
    names = list(runs[0].evaluated)
    students, teacher = aggregate_seeds(per_seed, names)
    results = RunResults(
        preset=preset,
        n=ev.n,
        seed=ev.seed,
        extractor=on.extractor,
        reference=len(on.reference),
        students=students,
        teacher=teacher,
        seeds=len(runs),
        floor=_floor(ctx),
        data_floor=on.fid_kid(on.train_images[:floor_n]),
        straightness_steps=ev.straightness_steps,
        fid_warning=fid_size_warning(on.extractor, ev.n, len(on.reference)),
        priors={name: prior_used(e, runs[0].priors.get(name, "auto")) for name, e in runs[0].evaluated.items()},
        knobs=[knob_name(k) for k in cfg.knobs if knob_name(k) in names],  # none where no seed < knob_seeds
        objectives={n: list(co) for n, co in crossed(cfg).items()} if cfg.objectives != ("fm",) else None,
        knob_settings={knob_name(k): k for k in cfg.knobs if knob_name(k) in names},
        per_seed=per_seed,
    )
    if ev.noise_seeds:
        results.sampling_spread = {
            name: _sampling_spread(
                ctx,
                name,
                runs[0].evaluated[name],
                per_seed[0]["students"][name],
                runs[0].priors.get(name, "auto"),
            )  # fmt: skip
            for name in names
            if name not in results.knobs
        }
    if ev.guidance:
        halves = [len(on.reference) // 2, len(on.reference) - len(on.reference) // 2]
        results.guidance = {"weights": [0.0, *ev.guidance], "nfes": list(ev.guidance_nfes), "halves": halves,
                            "rows": guided_rows(per_seed)}  # fmt: skip
    stages.done("evaluation", reused_all and not ctx.computed, t0)
    return results, grids


def guided_rows(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
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
    return rows
