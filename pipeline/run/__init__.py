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
single-seed run and its stages are reused. `first_seed=K` (`--first-seed K`) starts at seed K: one
run's seeds trained on several machines or in several sessions (`--seeds 1 --first-seed 1` on one,
`--seeds 1 --first-seed 2` on another), whose reports `nfm report merge` joins. Stage directories are
named by their hashes, so every seed's stages live side by side in RUN (seed k's costs in
RUN/costs-seed{k}.json). Every model is evaluated on the same noise (eval.seed); the report gives each
FID as a mean with a 95 % interval over the seeds. Beside them:

    knobs=eta=0,views=1,mix=0.25   NFM variants (KNOBS): other pairs or student settings, same teacher
    compute_matched=independent    baselines trained again for NFM's total compute (teacher + pairs + student)
    eval.noise_seeds=M             FID's own sampling noise: seed 0's students scored on M more noise seeds
    eval.guidance=0.5,1,2          classifier-free guidance: each model's weight chosen on half the held-out split,
                                   scored on the other half (evaluate.choose_guidance)
"""

from __future__ import annotations

import time
from pathlib import Path

from nfm.core.config import format_table, to_dict
from nfm.core.distributed import process_state
from nfm.core.io import write_json
from nfm.core.rundir import setup_logger
from nfm.pairs.format import INDEX_NAME
from nfm.pairs.lookup import default_cache_root
from nfm.pipeline.evaluate import check_extractor, default_extractor
from nfm.pipeline.run.budget import budget_flops, coupling_costs
from nfm.pipeline.run.config import (
    KNOBS,
    MATCHABLE,
    REFLOW_FROM,
    RUN_SEEDS,
    EvalConfig,
    ReflowConfig,
    RunConfig,
    RunCoupling,
    check_run,
    knob_config,
    knob_name,
    needs_teacher,
    seed_range,
    seeded,
)
from nfm.pipeline.run.context import RunContext, Stages, peak_rss_mb
from nfm.pipeline.run.evaluation import EvalContext, stage_evaluation
from nfm.pipeline.run.train import check_pair_space, train_seed

__all__ = [
    "KNOBS",
    "MATCHABLE",
    "REFLOW_FROM",
    "RUN_SEEDS",
    "EvalConfig",
    "ReflowConfig",
    "RunConfig",
    "RunCoupling",
    "budget_flops",
    "check_run",
    "knob_config",
    "knob_name",
    "needs_teacher",
    "run_pipeline",
    "seeded",
]


def run_settings(cfg: RunConfig, preset: str, from_teacher: str | None) -> dict:
    """A run's settings as its config.json and report.json record them."""
    return {"preset": preset, "from_teacher": from_teacher, **to_dict(cfg)}


def run_pipeline(
    cfg: RunConfig,
    run_dir: Path,
    preset: str = "custom",
    from_teacher: str | None = None,
    cache_root: Path | None = None,
    teacher_arch: str | None = None,
) -> Path | None:
    """Run (or resume, or reuse) every stage for every training seed; returns the report path (None on
    non-main processes). The config is checked once, here, before the first stage."""
    run_dir = Path(run_dir)
    check_run(cfg)
    state = process_state()
    log = setup_logger(run_dir, name="nfm.run", main=state.is_main_process)
    log.info(format_table(cfg, f"nfm run --preset {preset} -> {run_dir}"))
    if state.is_main_process:
        write_json(run_dir / "config.json", run_settings(cfg, preset, from_teacher))
    run = RunContext(run_dir, Path(cache_root or default_cache_root()), from_teacher, teacher_arch, Stages(log),
                     state.device, state.is_main_process)  # fmt: skip
    if not from_teacher:  # the evaluation's feature network, checked before hours of training
        check_extractor(cfg.eval.extractor or default_extractor(cfg.teacher.data.name))
        if run.main and needs_teacher(cfg) and cfg.pairs.check_space:
            check_pair_space(run, cfg)
    t_all = time.perf_counter()
    runs = [train_seed(run, seeded(cfg, k), k) for k in seed_range(cfg)]
    if not run.main:
        return None

    ctx = EvalContext.make(cfg.eval, run, runs[0])
    results, grids = stage_evaluation(cfg, ctx, runs, run.stages, preset)
    results.timings = run.stages.timings
    results.total_seconds = round(time.perf_counter() - t_all, 1)
    results.peak_rss_mb = peak_rss_mb()
    results.config = run_settings(cfg, preset, from_teacher)
    results.costs = coupling_costs(cfg, runs[0].trained, runs[0].seed.costs)
    results.student_steps = cfg.student.train.steps
    results.matched = runs[0].seed.costs.data.get("matched")
    results.exports = {name: [str(r.evaluated[name].resolve()) for r in runs if name in r.evaluated]
                       for name in runs[0].evaluated}  # fmt: skip
    if runs[0].teacher_source is not None:
        results.exports["teacher"] = [r.teacher_source for r in runs]
    if runs[0].pairs is not None:
        pairs = runs[0].pairs
        results.pair_cache = {"key": pairs.key, "path": str(pairs.path), "index": str(pairs.path / INDEX_NAME)}
    from nfm.core.sampling import sample_labels
    from nfm.pipeline.report import write_report

    # the labels of the grids' samples: every model sampled the same fixed inputs (student_inputs)
    labels = sample_labels(min(ctx.ev.n, 100), runs[0].seed.train_data().num_classes, None, ctx.on.reference_labels)
    report = write_report(results, grids, run_dir, labels=labels)
    log.info(f"report: {report}")
    return report
