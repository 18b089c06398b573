"""`nfm run`: every stage, evaluation and the report."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from nfm.pipeline.cli import options


def cmd_run(args) -> int:
    """everything: teacher -> pairs -> students -> evaluation -> report

    Runs teacher, pair cache, one student per coupling (`couplings=nfm,independent,minibatch-ot,sd-ot,sb,reflow,
    nfm-reflow`; `run.couplings=...` is the same), FID/KID evaluation and the report in one run directory.
    Finished stages are reused, interrupted ones resume: rerun the same command. Evidence settings:
    `--seeds 3` (intervals; `--first-seed K` and `nfm report merge` split them across machines),
    `knobs=eta=0,views=1,mix=0.25` (NFM variants), `compute_matched=independent`
    (baselines at NFM's total compute), `eval.noise_seeds=5` (FID's own sampling spread),
    `objectives=fm,meanflow,shortcut` (one-step students of every coupling, sampled at eval.mean_nfes).
    """
    from nfm.pipeline.presets import run_preset
    from nfm.pipeline.run import RunConfig, run_pipeline

    overrides = [o.removeprefix("run.") for o in args.overrides]  # run.couplings=... reads as couplings=...
    if args.seeds is not None:
        overrides.append(f"seeds={args.seeds}")
    if args.first_seed is not None:
        overrides.append(f"first_seed={args.first_seed}")
    cfg = options.configure(args, RunConfig, run_preset(args.preset), overrides)
    run_dir = Path(args.run_dir or f"runs/run-{args.preset}")
    t0 = time.perf_counter()
    report = run_pipeline(cfg, run_dir, args.preset, args.from_teacher, options.cache_root(args), args.teacher_arch)
    if report is not None:
        print(f"done in {time.perf_counter() - t0:.0f}s. report: {report}")
    return 0


def register(stages: argparse._SubParsersAction) -> None:
    from nfm.pipeline.presets import RUN_PRESETS

    p = options.add_command(stages, "run", cmd_run)
    options.add_preset(p, RUN_PRESETS)
    p.add_argument(
        "--from-teacher",
        metavar="SPEC",
        help="start from an existing teacher (skips stage one): an export, ml-tarflow:PATH.pth or "
        "python:module:factory; teachers that do not record their data take the preset's (teacher.data.*)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        metavar="N",
        help="train teacher, pairs and students N times (seed k adds 1000 k to every training seed; seed 0 is "
        "the single-seed run, reused); the report gives every FID as a mean with its 95%% interval",
    )
    p.add_argument(
        "--first-seed",
        type=int,
        metavar="K",
        help="start at training seed K: seeds K .. K+N-1 (a run's seeds split across machines or sessions; "
        "`nfm report merge` joins their reports)",
    )
    options.add_teacher_arch(p)
    options.add_cache_dir(p)
    options.add_config_layers(
        p,
        "teacher.train.steps=2000 pairs.views=8 student.train.steps=1000 eval.n=500",
        "run directory (default runs/run-PRESET)",
    )
