"""`nfm student train | sample | eval`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from nfm.core.errors import NFMError
from nfm.pipeline.cli import options


def cmd_train(args) -> int:
    """train (or resume) a flow-matching student on a coupling

    Flow matching on the teacher's pairs (nfm), a reflow cache (reflow) or a baseline coupling (independent,
    minibatch-ot, sd-ot: semidiscrete OT, sb: Schrodinger bridge with flow.sigma and flow.path=bridge), with the
    same network, steps and batch; flow.source=data:NAME starts from a data set instead of N(0, I). Rerunning the
    same command resumes, data position included.
    """
    from nfm.core.config import _merge
    from nfm.pipeline.presets import student_preset, student_size_overrides
    from nfm.student.train import StudentRunConfig, run_student_training

    preset = student_preset(args.preset)
    if args.size:
        preset = _merge(preset, student_size_overrides(args.size))
    flow = {k: v for k, v in (("coupling", args.coupling), ("pairs", args.pairs), ("objective", args.objective)) if v}
    preset = _merge(preset, {"flow": flow})
    cfg = options.configure(args, StudentRunConfig, preset)
    run_dir = Path(args.run_dir or f"runs/student-{args.preset}-{cfg.flow.coupling}")
    t0 = time.perf_counter()
    return options.finished("student", t0, run_dir, run_student_training(cfg, run_dir, options.cache_root(args)))


def _run_dir(run: str) -> Path:
    """A student run directory, or an export's run directory."""
    p = Path(run)
    return p if (p / "export").is_dir() else p.parent


def cmd_sample(args) -> int:
    """sample a trained student with an ODE solver"""
    from nfm.core.hub import local_or_hub
    from nfm.core.sampling import save_samples
    from nfm.student.sampling import pick_solver, sample_ode, student_inputs
    from nfm.student.train import load_student, student_prior

    device = options.device(args)
    path = local_or_hub(args.run)
    model, meta = load_student(path, device)
    mc = meta["model"]
    prior = student_prior(path, meta, args.prior)
    inputs = student_inputs(meta, args.n, seed=args.seed, device=device, label=args.label, prior=prior)
    t0, solver = time.perf_counter(), pick_solver(args.solver, model)
    x, stats = sample_ode(
        model, inputs.z, inputs.y, solver=solver, steps=args.steps, grid=args.grid, guidance=args.guidance,
        rtol=args.rtol, atol=args.atol, num_classes=mc["num_classes"],
    )  # fmt: skip
    dt = time.perf_counter() - t0
    here = _run_dir(args.run) if Path(args.run).expanduser().exists() else Path(".")  # a Hub id: the working dir
    base = options.samples_path(args, here, f"sample-{solver}-{stats['nfe']}")
    meta_str = {**{k: str(v) for k, v in stats.items()}, "prior": "fitted" if prior else "gaussian"}
    png = save_samples(x, inputs, mc["num_classes"], base, tensors=True, metadata=meta_str)
    print(
        f"{args.n} samples from {'the fitted prior' if prior else 'N(0, I)'}, solver {solver}, "
        f"NFE {stats['nfe']} ({stats['forward_passes']} forward passes), "
        f"{dt:.2f}s ({args.n / dt:.0f} img/s) -> {png}"
    )
    return 0


def cmd_eval(args) -> int:
    """bits/dim of a student as a continuous normalizing flow (likelihood through the ODE)

    log p(x) = log p_0(x_0) - int div v dt, integrated from the data back to the noise with torchdiffeq; exact
    divergence for small images, Hutchinson's estimator for large ones. Pass the teacher's eta (--eta) to compare
    with `nfm teacher eval`.
    """
    from nfm.core.config import from_dict
    from nfm.core.data import DataConfig, load_data
    from nfm.student.likelihood import student_bpd
    from nfm.student.train import load_student, student_prior

    model, meta = load_student(args.run, options.device(args))
    data_cfg = from_dict(DataConfig, {**meta.get("data", {}), **({"name": args.data} if args.data else {})})
    x, y = load_data(data_cfg, args.split).tensors()
    mc = meta["model"]
    want = (mc["in_channels"], mc["img_size"], mc["img_size"])
    if tuple(x.shape[1:]) != want:
        raise NFMError(
            f"{data_cfg.name} images are {'x'.join(map(str, x.shape[1:]))} but this student models "
            f"{'x'.join(map(str, want))} images: pass --data NAME with the data it was trained on"
        )
    if args.n:
        x, y = x[: args.n], y[: args.n]
    t0 = time.perf_counter()
    res = student_bpd(
        model, meta, x, y, eta=args.eta, hutchinson=args.hutchinson, solver=args.solver, batch=args.batch_size,
        progress=lambda n: print(f"  {n}/{len(x)} images", flush=True), prior=student_prior(args.run, meta, args.prior),
    )  # fmt: skip
    res = {"split": args.split, **res, "seconds": round(time.perf_counter() - t0, 1)}
    out = _run_dir(args.run) / f"eval-likelihood-{args.split}.json"
    return options.write_result(out, res)


def register(stages: argparse._SubParsersAction) -> None:
    from nfm.pipeline.presets import STUDENT_PRESETS
    from nfm.student.names import COUPLINGS, GRIDS, OBJECTIVES, SOLVERS, STUDENT_SIZES

    sub = options.add_group(stages, "student", "stage three: the flow-matching student")

    p = options.add_command(sub, "train", cmd_train)
    options.add_preset(p, STUDENT_PRESETS)
    p.add_argument("--coupling", choices=COUPLINGS, help="coupling (default nfm)")
    p.add_argument(
        "--objective", choices=OBJECTIVES,
        help="fm (default): the velocity; meanflow or shortcut: the average velocity over a step (one-step sampling)",
    )  # fmt: skip
    p.add_argument("--pairs", help="nfm / reflow coupling: pair cache key, key prefix or directory")
    p.add_argument("--size", help=f"named network size ({', '.join(STUDENT_SIZES)})")
    options.add_cache_dir(p)
    options.add_config_layers(
        p,
        "train.steps=500 flow.path=vp flow.time=logit-normal flow.sigma=0.5 flow.source=data:mnist-5k",
        "run directory (default runs/student-PRESET-COUPLING)",
    )

    p = options.add_command(sub, "sample", cmd_sample)
    p.add_argument("run", help="student run directory, export directory, or Hub repo id (owner/name)")
    p.add_argument(
        "--solver", default="auto", choices=["auto", *SOLVERS],
        help="ODE solver (default auto: mean for a one-step student, meanflow or shortcut; euler otherwise)",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=4, help="steps of a fixed-step solver (default 4)")
    p.add_argument("--grid", default="uniform", choices=GRIDS, help="time grid (default uniform)")
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight w (default 0)")
    p.add_argument("--rtol", type=float, default=1e-5, help="dopri5 relative tolerance")
    p.add_argument("--atol", type=float, default=1e-5, help="dopri5 absolute tolerance")
    p.add_argument(
        "--prior", default="auto", choices=("auto", "gaussian", "fitted"),
        help="the noise to start from: auto (the prior the export records: fitted to its pair cache for a student "
        "of a teacher's pairs, else N(0, I)), gaussian (N(0, I)), fitted (the recorded one, required)",
    )  # fmt: skip
    options.add_sample_outputs(p)

    p = options.add_command(sub, "eval", cmd_eval)
    p.add_argument("run", help="student run directory or export directory")
    p.add_argument(
        "--prior", default="auto", choices=("auto", "gaussian", "fitted"),
        help="the density at the noise end: auto (the export's fitted prior if it records one, else N(0, I))",
    )  # fmt: skip
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--data", help="evaluate on another data source (default: the student's own)")
    p.add_argument("--n", type=int, default=0, help="first N images only (default: all)")
    p.add_argument("--eta", type=float, default=0.0, help="Gaussian noise added to the images (default 0)")
    p.add_argument(
        "--hutchinson",
        type=int,
        default=-1,
        help="Rademacher probes for the divergence; 0: exact; default: exact up to 1,024 dimensions, else 8",
    )
    p.add_argument("--solver", default="dopri5", choices=list(SOLVERS), help="dopri5 (default) or a fixed-step solver")
    p.add_argument("--batch-size", type=int, default=256)
    options.add_device(p)
