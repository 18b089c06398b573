"""The `nfm` command.

    nfm teacher train  [--preset digits] [--config FILE] [--run-dir DIR] [--size NAME] [key=value ...]
    nfm teacher sample RUN [--n 100] [--guidance W] [--temperature T] [--no-denoise] [--out PNG]
    nfm teacher eval   RUN [--split test]
    nfm teacher import ml-tarflow:PATH.pth --out DIR [--teacher-arch k=v,...] [--data NAME]
    nfm pairs build    --teacher RUN|ml-tarflow:PATH|python:mod:factory [--data NAME] [--views K] [key=value ...]
    nfm pairs ls | verify KEY | rm KEY
    nfm student train  [--preset digits] [--coupling nfm|independent|minibatch-ot] [--pairs KEY] [key=value ...]
    nfm student sample RUN [--solver euler|midpoint|heun|rk4|dopri5] [--steps 4] [--grid uniform|data-end]
    nfm student eval   RUN [--split test] [--eta 0.1] [--hutchinson K]

Every entry point takes a preset, a config file (JSON/TOML) and `section.key=value` overrides,
and prints the resolved config. Rerunning a training command resumes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pipeline.errors import NFMError

SPEC_HELP = "teacher run/export directory, ml-tarflow:PATH.pth, or python:package.module:factory"
ARCH_HELP = (
    "architecture of an ml-tarflow / python teacher as key=value,... e.g. "
    "patch_size=8,in_channels=3,noise_std=0.07,num_classes=0 (ml-tarflow: inferred from shapes and file name "
    "where possible; python: passed to the factory)"
)


def _device(name: str | None):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _add_config_args(p: argparse.ArgumentParser, default_preset: str) -> None:
    from pipeline.presets import TEACHER_PRESETS

    names = ", ".join(TEACHER_PRESETS)
    p.add_argument("--preset", default=default_preset, help=f"named preset: {names} (default: {default_preset})")
    p.add_argument("--config", metavar="FILE", help="config file (JSON or TOML) layered over the preset")
    p.add_argument(
        "--run-dir", metavar="DIR", help="run directory (default: runs/teacher-PRESET); an existing one is resumed"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. train.steps=500 model.width=64 data.name=fashion-mnist",
    )


def cmd_teacher_train(args) -> int:
    from pipeline.config import _merge, build_config
    from pipeline.presets import size_overrides, teacher_preset
    from teacher.train import TeacherRunConfig, run_teacher_training

    preset = teacher_preset(args.preset)
    if args.size:
        preset = _merge(preset, size_overrides(args.size))
    cfg = build_config(TeacherRunConfig, preset=preset, file=args.config, overrides=args.overrides)
    run_dir = Path(args.run_dir or f"runs/teacher-{args.preset}")
    t0 = time.perf_counter()
    export = run_teacher_training(cfg, run_dir)
    return _finished("teacher", t0, run_dir, export)


def _finished(kind: str, t0: float, run_dir: Path, export: Path) -> int:
    """Where a training command left its export and newest sample grid (main process only)."""
    from pipeline.training import process_state

    if process_state().is_main_process:
        print(f"done in {time.perf_counter() - t0:.0f}s. {kind} export: {export}")
        samples = sorted((run_dir / "samples").glob("*.png"))
        if samples:
            print(f"samples: {samples[-1]}")
    return 0


def cmd_teacher_sample(args) -> int:
    import torch

    from pipeline.images import save_grid
    from pipeline.io import save_tensors
    from teacher.export import load_teacher, resolve_export_dir

    device = _device(args.device)
    model = load_teacher(args.run, device)
    if args.n <= 0:
        raise NFMError(f"--n must be positive, got {args.n}")
    g = torch.Generator().manual_seed(args.seed)
    if args.label is not None:
        y = torch.full((args.n,), args.label, dtype=torch.long)
    elif model.num_classes:
        y = torch.arange(args.n) % model.num_classes
    else:
        y = None
    z = torch.randn(args.n, *model.image_shape, generator=g) * args.temperature * model.prior_std.cpu()
    t0 = time.perf_counter()
    stats: dict = {}
    x = model.decode(
        z.to(device),
        None if y is None else y.to(device),
        guidance=args.guidance,
        annealed_guidance=args.annealed,
        attn_temp=args.attn_temp,
        method=args.decoder,
        tol=args.tol,
        chunk=args.chunk,
        max_iters=args.max_iters,
        stats=stats,
    )
    if args.decoder == "jacobi":
        print(f"jacobi iterations per block: {stats['iterations']} (sequential: {model.cfg.num_patches - 1} steps)")
    if not args.no_denoise and model.noise_std > 0:
        x = model.denoise(x, None if y is None else y.to(device))
    dt = time.perf_counter() - t0
    base = Path(args.out) if args.out else resolve_export_dir(args.run).parent / "samples" / "sample"
    base = base.with_suffix("")
    tensors = {"images": x.cpu(), "noise": z}
    if y is not None:
        tensors["labels"] = y
    save_tensors(base.with_suffix(".safetensors"), tensors)
    nrow = model.num_classes if model.num_classes and args.n % model.num_classes == 0 and args.label is None else None
    save_grid(x, base.with_suffix(".png"), nrow=nrow)
    print(
        f"{args.n} samples in {dt:.1f}s ({args.n / dt:.1f} img/s) -> {base.with_suffix('.png')}, "
        f"{base.with_suffix('.safetensors')}"
    )
    return 0


def cmd_teacher_import(args) -> int:
    from dataclasses import asdict

    from pipeline.config import build_config
    from pipeline.data import DataConfig
    from teacher.export import save_export
    from teacher.protocol import load_teacher_spec, parse_spec

    spec = parse_spec(args.spec, args.teacher_arch)
    if spec.kind != "ml-tarflow":
        raise NFMError(f"nfm teacher import converts ml-tarflow:PATH checkpoints; got {args.spec!r}")
    out = Path(args.out)
    if (out / "config.json").exists():
        raise NFMError(f"{out} already holds an export; choose another --out or delete it first")
    t0 = time.perf_counter()
    model, info = load_teacher_spec(spec, "cpu")
    extra = {"imported_from": {"kind": "ml-tarflow", "path": info["path"], "arch": info["arch"]}}
    if args.data:  # other data settings: pass them to `nfm pairs build` as data.key=value
        extra["data"] = asdict(build_config(DataConfig, preset={"name": args.data}))
    save_export(model, out, step=0, extra=extra)
    n = sum(p.numel() for p in model.parameters())
    cfg = model.cfg
    print(
        f"imported {spec.target} ({n / 1e6:.1f} M parameters; {cfg.in_channels}x{cfg.img_size}x{cfg.img_size}, "
        f"patch {cfg.patch_size}, width {cfg.width}, {cfg.num_blocks} blocks x {cfg.layers_per_block} layers, "
        f"{cfg.num_classes} classes, eta {cfg.noise_std}) in {time.perf_counter() - t0:.1f}s -> {out}\n"
        f"fingerprint {model.fingerprint()}; next: nfm pairs build --teacher {out}"
        + ("" if "data" in extra else " --data NAME")
    )
    return 0


def cmd_teacher_eval(args) -> int:
    from pipeline.config import from_dict
    from pipeline.data import DataConfig, load_data
    from pipeline.io import write_json
    from teacher.export import export_info, load_teacher, resolve_export_dir
    from teacher.train import evaluate_bpd

    device = _device(args.device)
    model = load_teacher(args.run, device)
    info = export_info(args.run)
    data_cfg = from_dict(DataConfig, info.get("data", {}))
    if args.data:
        data_cfg = from_dict(DataConfig, {**info.get("data", {}), "name": args.data})
    data = load_data(data_cfg, args.split)
    t0 = time.perf_counter()
    bpd = evaluate_bpd(model, data, batch_size=args.batch_size)
    result = {
        "split": args.split,
        "data": data.describe(),
        "bits_per_dim": bpd,
        "noise_std": model.noise_std,
        "images": len(data),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    out = resolve_export_dir(args.run).parent / f"eval-{args.split}.json"
    write_json(out, result)
    print(json.dumps(result, indent=2))
    print(f"written: {out}")
    return 0


def cmd_student_eval(args) -> int:
    from pipeline.config import from_dict
    from pipeline.data import DataConfig, load_data
    from pipeline.io import write_json
    from student.likelihood import student_bpd
    from student.train import load_student

    device = _device(args.device)
    model, meta = load_student(args.run, device)
    data_cfg = from_dict(DataConfig, {**meta.get("data", {}), **({"name": args.data} if args.data else {})})
    x, y = load_data(data_cfg, args.split).tensors()
    if args.n:
        x, y = x[: args.n], y[: args.n]
    t0 = time.perf_counter()
    res = student_bpd(
        model,
        meta,
        x,
        y,
        eta=args.eta,
        hutchinson=args.hutchinson,
        solver=args.solver,
        batch=args.batch_size,
        progress=lambda n: print(f"  {n}/{len(x)} images", flush=True),
    )
    res = {"split": args.split, **res, "seconds": round(time.perf_counter() - t0, 1)}
    run = Path(args.run)
    out = (run.parent if run.name == "export" else run) / f"eval-likelihood-{args.split}.json"
    write_json(out, res)
    print(json.dumps(res, indent=2))
    print(f"written: {out}")
    return 0


def _cache_root(args) -> Path:
    from pairs.build import default_cache_root

    return Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_root()


def cmd_pairs_build(args) -> int:
    from pairs.build import PairsRunConfig, build_pairs
    from pipeline.config import build_config, format_table
    from pipeline.data import load_data
    from pipeline.training import process_state
    from teacher.protocol import load_teacher_spec

    state = process_state()
    teacher, info = load_teacher_spec(args.teacher, state.device, args.teacher_arch)
    preset: dict = {"data": dict(info.get("data") or {}), "pairs": {}}
    if args.data:
        preset["data"]["name"] = args.data
    elif not info.get("data") and not any(o.startswith("data.") for o in args.overrides):
        raise NFMError(
            f"the teacher {args.teacher} does not say what data it models: pass --data NAME "
            "(digits, fashion-mnist, a Hugging Face dataset or directory)"
        )
    for flag in ("views", "dtype", "seed", "batch_size"):
        if getattr(args, flag) is not None:
            preset["pairs"][flag] = getattr(args, flag)
    cfg = build_config(PairsRunConfig, preset=preset, file=args.config, overrides=args.overrides)
    log = print if state.is_main_process else (lambda *a: None)
    log(format_table(cfg, "nfm pairs build"))
    data = load_data(cfg.data, cfg.pairs.split)
    log(data.describe())
    cache_dir = build_pairs(teacher, data, cfg.pairs, _cache_root(args), teacher_info=info, log=log)
    if state.is_main_process:
        print(f"key: {cache_dir.name}\npath: {cache_dir}")
    return 0


def cmd_pairs_ls(args) -> int:
    from pairs.build import cache_summary
    from pairs.format import INDEX_NAME

    root = _cache_root(args)
    rows = []
    for d in sorted(root.glob("*")) if root.is_dir() else []:
        if (d / INDEX_NAME).is_file():
            try:
                rows.append(cache_summary(d))
            except NFMError as e:
                rows.append(
                    {
                        "key": d.name,
                        "teacher": "?",
                        "data": f"unreadable: {e}",
                        "rows": "",
                        "views": "",
                        "dtype": "",
                        "size_mb": "",
                        "complete": False,
                    }
                )
    if not rows:
        print(f"no pair caches under {root}")
        return 0
    cols = ["key", "teacher", "data", "rows", "views", "dtype", "size_mb", "complete"]
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(width[c]) for c in cols))
    print(f"({len(rows)} caches under {root})")
    return 0


def cmd_pairs_verify(args) -> int:
    from pairs.format import read_index
    from pairs.verify import check_shards, find_cache, reconstruction_error
    from teacher.protocol import load_teacher_spec

    cache_dir = find_cache(args.key, _cache_root(args))
    t0 = time.perf_counter()
    problems = check_shards(cache_dir)
    if problems:
        raise NFMError(
            f"pair cache {cache_dir.name} failed verification:\n  "
            + "\n  ".join(problems)
            + f"\nRebuild it: nfm pairs rm {cache_dir.name}, then nfm pairs build"
        )
    index = read_index(cache_dir)
    print(f"{len(index['shards'])} shards, {index['total_rows']} pairs: sha256 ok ({time.perf_counter() - t0:.1f}s)")
    if args.samples > 0:
        source = args.teacher or index["teacher"].get("source")
        if not source:
            raise NFMError("the cache does not record its teacher; pass --teacher PATH to check reconstruction")
        arch = None if args.teacher else index["teacher"].get("arch")
        teacher, _ = load_teacher_spec(source, _device(args.device), arch or None)
        rec = reconstruction_error(cache_dir, teacher, args.samples)
        print(
            f"reconstruction on {rec['pairs_checked']} pairs: worst |decode(noise*sigma_f) - (x + eta*eps)| = "
            f"{rec['worst_abs_error']:.3g} (mean of per-pair max {rec['mean_max_abs_error']:.3g}; "
            f"noise stored as {index['dtypes']['noise']})"
        )
        if rec["worst_abs_error"] > args.tolerance:
            raise NFMError(f"reconstruction error {rec['worst_abs_error']:.3g} exceeds --tolerance {args.tolerance}")
    print(f"pair cache {cache_dir.name}: OK")
    return 0


def cmd_pairs_rm(args) -> int:
    import shutil

    from pairs.verify import find_cache

    cache_dir = find_cache(args.key, _cache_root(args))
    shutil.rmtree(cache_dir)
    print(f"removed {cache_dir}")
    return 0


def cmd_student_train(args) -> int:
    from pipeline.config import _merge, build_config
    from pipeline.presets import student_preset, student_size_overrides
    from student.train import StudentRunConfig, run_student_training

    preset = student_preset(args.preset)
    if args.size:
        preset = _merge(preset, student_size_overrides(args.size))
    flow = {k: v for k, v in (("coupling", args.coupling), ("pairs", args.pairs)) if v}
    preset = _merge(preset, {"flow": flow})
    cfg = build_config(StudentRunConfig, preset=preset, file=args.config, overrides=args.overrides)
    run_dir = Path(args.run_dir or f"runs/student-{args.preset}-{cfg.flow.coupling}")
    t0 = time.perf_counter()
    export = run_student_training(cfg, run_dir, _cache_root(args))
    return _finished("student", t0, run_dir, export)


def cmd_student_sample(args) -> int:
    import torch

    from pipeline.images import save_grid
    from pipeline.io import save_tensors
    from student.paths import ProbPath
    from student.sampling import sample_ode
    from student.train import load_student

    device = _device(args.device)
    model, meta = load_student(args.run, device)
    mc, flow = meta["model"], meta["flow"]
    if args.n <= 0:
        raise NFMError(f"--n must be positive, got {args.n}")
    shape = (mc["in_channels"], mc["img_size"], mc["img_size"])
    z = torch.randn(args.n, *shape, generator=torch.Generator().manual_seed(args.seed))
    if args.label is not None:
        y = torch.full((args.n,), args.label, dtype=torch.long)
    else:
        y = torch.arange(args.n) % mc["num_classes"] if mc["num_classes"] else None
    prior = ProbPath.from_flow(flow).prior_scale
    t0 = time.perf_counter()
    x, stats = sample_ode(
        model,
        z.to(device),
        None if y is None else y.to(device),
        solver=args.solver,
        steps=args.steps,
        grid=args.grid,
        guidance=args.guidance,
        rtol=args.rtol,
        atol=args.atol,
        prior_scale=prior,
        num_classes=mc["num_classes"],
    )
    dt = time.perf_counter() - t0
    run = Path(args.run)
    default = (run if (run / "export").is_dir() else run.parent) / "samples" / f"sample-{args.solver}-{stats['nfe']}"
    base = (Path(args.out) if args.out else default).with_suffix("")
    tensors = {"images": x.cpu(), "noise": z, **({"labels": y} if y is not None else {})}
    save_tensors(base.with_suffix(".safetensors"), tensors, metadata={k: str(v) for k, v in stats.items()})
    k = mc["num_classes"]
    save_grid(x, base.with_suffix(".png"), nrow=k if k and args.n % k == 0 and args.label is None else None)
    print(
        f"{args.n} samples, solver {args.solver}, NFE {stats['nfe']} ({stats['forward_passes']} forward passes), "
        f"{dt:.2f}s ({args.n / dt:.0f} img/s) -> {base.with_suffix('.png')}"
    )
    return 0


def cmd_run(args) -> int:
    from pipeline.config import build_config
    from pipeline.presets import run_preset
    from pipeline.run import RunConfig, run_pipeline

    cfg = build_config(RunConfig, preset=run_preset(args.preset), file=args.config, overrides=args.overrides)
    run_dir = Path(args.run_dir or f"runs/run-{args.preset}")
    t0 = time.perf_counter()
    report = run_pipeline(cfg, run_dir, args.preset, args.from_teacher, _cache_root(args), args.teacher_arch)
    if report is not None:
        print(f"done in {time.perf_counter() - t0:.0f}s. report: {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nfm", description="Normalized Flow Matching: teacher, pairs, student.")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    teacher = stages.add_parser("teacher", help="stage one: the TarFlow teacher")
    tsub = teacher.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = tsub.add_parser(
        "train",
        help="train (or resume) a TarFlow teacher",
        description="Train a TarFlow teacher by maximum likelihood on x + eta * eps. "
        "Rerunning the same command resumes from the newest checkpoint.",
    )
    _add_config_args(p, "digits")
    from teacher.model import TARFLOW_SIZES

    p.add_argument("--size", help=f"named TarFlow size ({', '.join(TARFLOW_SIZES)}), applied before overrides")
    p.set_defaults(func=cmd_teacher_train)

    p = tsub.add_parser("sample", help="sample images from a trained teacher")
    p.add_argument("run", help="teacher run directory or export directory")
    p.add_argument("--n", type=int, default=100, help="number of samples (default 100)")
    p.add_argument("--label", type=int, help="class of every sample (default: cycle through the classes)")
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight (default 0)")
    p.add_argument("--annealed", action="store_true", help="anneal guidance linearly over the patches")
    p.add_argument("--attn-temp", type=float, default=1.0, help="attention temperature of the unguided branch")
    p.add_argument("--temperature", type=float, default=1.0, help="prior temperature (default 1)")
    p.add_argument("--no-denoise", action="store_true", help="skip the score denoising step")
    p.add_argument(
        "--decoder",
        choices=["sequential", "jacobi"],
        default="sequential",
        help="sequential (KV-cached, patch by patch; default) or jacobi (parallel fixed-point iteration)",
    )
    p.add_argument("--tol", type=float, default=1e-4, help="jacobi: stop when the largest change is below this")
    p.add_argument("--chunk", type=int, default=0, help="jacobi: patches per Gauss-Seidel chunk (0: all)")
    p.add_argument("--max-iters", type=int, default=0, help="jacobi: iteration cap per chunk (0: chunk length, exact)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output path without suffix (writes .png and .safetensors)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.set_defaults(func=cmd_teacher_sample)

    p = tsub.add_parser("eval", help="bits/dim of a trained teacher on held-out data")
    p.add_argument("run", help="teacher run directory or export directory")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--data", help="evaluate on another data source (default: the teacher's own)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(func=cmd_teacher_eval)

    p = tsub.add_parser(
        "import",
        help="convert a pretrained teacher (an apple/ml-tarflow .pth) into this project's export",
        description="Loads an ml-tarflow state dict with torch.load(weights_only=True), maps it exactly onto "
        "this project's TarFlow and writes model.safetensors + config.json: a teacher export that "
        "`nfm pairs build --teacher DIR` and `nfm run --from-teacher DIR` take. The architecture comes from "
        "the tensor shapes, the file name ({data}_model_{patch}_{width}_{blocks}_{layers}_{eta}.pth) and "
        "--teacher-arch.",
    )
    p.add_argument(
        "spec", metavar="ml-tarflow:PATH", help="the checkpoint, e.g. ml-tarflow:afhq_model_8_768_8_8_0.07.pth"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="export directory to write")
    p.add_argument("--teacher-arch", metavar="K=V,...", help=ARCH_HELP)
    p.add_argument("--data", help="the data set it models (recorded so pairs build needs no --data)")
    p.set_defaults(func=cmd_teacher_import)

    pairs = stages.add_parser("pairs", help="stage two: the teacher's noise/data pair cache")
    psub = pairs.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cache_help = "cache root (default: $NFM_CACHE_DIR/pairs or ~/.cache/nfm/pairs)"

    p = psub.add_parser(
        "build",
        help="invert a teacher over a data set into a pair cache (or reuse it)",
        description="z = encode(x + eta*eps) / sigma_f for every training image, in sharded "
        "safetensors. A second build with the same inputs is a cache hit; an interrupted build "
        "resumes. Under `accelerate launch`/torchrun each process builds its own shards.",
    )
    p.add_argument("--teacher", required=True, metavar="SPEC", help=SPEC_HELP)
    p.add_argument("--teacher-arch", metavar="K=V,...", help=ARCH_HELP)
    p.add_argument("--data", help="data source (default: the teacher's own; required for ml-tarflow/python teachers)")
    p.add_argument("--views", type=int, help="noise draws per image (default 1)")
    p.add_argument("--dtype", choices=["float16", "float32"], help="noise storage dtype (default float16)")
    p.add_argument("--seed", type=int, help="seed of the per-row noise (default 0)")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="encode batch (default 256)")
    p.add_argument("--config", metavar="FILE", help="config file (JSON or TOML)")
    p.add_argument("--cache-dir", help=cache_help)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. pairs.shard_mb=64 data.held_out=0.1")
    p.set_defaults(func=cmd_pairs_build)

    p = psub.add_parser("ls", help="list the pair caches")
    p.add_argument("--cache-dir", help=cache_help)
    p.set_defaults(func=cmd_pairs_ls)

    p = psub.add_parser("verify", help="re-hash every shard and check reconstruction through the teacher")
    p.add_argument("key", help="cache key, unique key prefix, or cache directory")
    p.add_argument("--samples", type=int, default=64, help="pairs decoded for the reconstruction check (0: skip)")
    p.add_argument("--tolerance", type=float, default=0.1, help="worst reconstruction error allowed (default 0.1)")
    p.add_argument("--teacher", metavar="SPEC", help="teacher to decode with (default: the one recorded in the cache)")
    p.add_argument("--cache-dir", help=cache_help)
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(func=cmd_pairs_verify)

    p = psub.add_parser("rm", help="delete a pair cache")
    p.add_argument("key", help="cache key, unique key prefix, or cache directory")
    p.add_argument("--cache-dir", help=cache_help)
    p.set_defaults(func=cmd_pairs_rm)

    student = stages.add_parser("student", help="stage three: the flow-matching student")
    ssub = student.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from pipeline.presets import STUDENT_PRESETS
    from student.couplings import COUPLINGS
    from student.models import STUDENT_SIZES
    from student.sampling import GRIDS, SOLVERS

    p = ssub.add_parser(
        "train",
        help="train (or resume) a flow-matching student on a coupling",
        description="Flow matching on the teacher's pairs (nfm) or a baseline coupling "
        "(independent, minibatch-ot), with the same network, steps and batch. Rerunning the same "
        "command resumes, data position included.",
    )
    p.add_argument("--preset", default="digits", help=f"named preset: {', '.join(STUDENT_PRESETS)} (default digits)")
    p.add_argument("--coupling", choices=COUPLINGS, help="coupling (default nfm)")
    p.add_argument("--pairs", help="nfm coupling: pair cache key, key prefix or directory")
    p.add_argument("--size", help=f"named network size ({', '.join(STUDENT_SIZES)})")
    p.add_argument("--config", metavar="FILE", help="config file (JSON or TOML) layered over the preset")
    p.add_argument("--run-dir", metavar="DIR", help="run directory (default runs/student-PRESET-COUPLING)")
    p.add_argument("--cache-dir", help=cache_help)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="e.g. train.steps=500 flow.path=vp flow.time=logit-normal model.width=64",
    )
    p.set_defaults(func=cmd_student_train)

    p = ssub.add_parser("sample", help="sample a trained student with an ODE solver")
    p.add_argument("run", help="student run directory or export directory")
    p.add_argument("--solver", default="euler", help=f"{', '.join(SOLVERS)} (default euler)")
    p.add_argument("--steps", type=int, default=4, help="steps of a fixed-step solver (default 4)")
    p.add_argument("--grid", default="uniform", help=f"time grid: {', '.join(GRIDS)} (default uniform)")
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight w (default 0)")
    p.add_argument("--rtol", type=float, default=1e-5, help="dopri5 relative tolerance")
    p.add_argument("--atol", type=float, default=1e-5, help="dopri5 absolute tolerance")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--label", type=int, help="class of every sample (default: cycle through the classes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output path without suffix (writes .png and .safetensors)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(func=cmd_student_sample)

    p = ssub.add_parser(
        "eval",
        help="bits/dim of a student as a continuous normalizing flow (likelihood through the ODE)",
        description="log p(x) = log p_0(x_0) - int div v dt, integrated from the data back to the noise "
        "with torchdiffeq; exact divergence for small images, Hutchinson's estimator for large ones. "
        "Pass the teacher's eta (--eta) to compare with `nfm teacher eval`.",
    )
    p.add_argument("run", help="student run directory or export directory")
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
    p.add_argument("--solver", default="dopri5", help="dopri5 (default, rtol=atol=1e-5) or a fixed-step solver")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(func=cmd_student_eval)

    from pipeline.presets import RUN_PRESETS

    p = stages.add_parser(
        "run",
        help="everything: teacher -> pairs -> students -> evaluation -> report",
        description="Runs teacher, pair cache, the nfm / independent / minibatch-ot students, "
        "FID/KID evaluation and the report in one run directory. Finished stages are reused, "
        "interrupted ones resume: rerun the same command.",
    )
    p.add_argument("--preset", default="digits", help=f"named preset: {', '.join(RUN_PRESETS)} (default digits)")
    p.add_argument(
        "--from-teacher",
        metavar="SPEC",
        help="start from an existing teacher (skips stage one): an export, ml-tarflow:PATH.pth or "
        "python:module:factory; teachers that do not record their data take the preset's (teacher.data.*)",
    )
    p.add_argument("--teacher-arch", metavar="K=V,...", help=ARCH_HELP)
    p.add_argument("--config", metavar="FILE", help="config file (JSON or TOML) layered over the preset")
    p.add_argument("--run-dir", metavar="DIR", help="run directory (default runs/run-PRESET)")
    p.add_argument("--cache-dir", help=cache_help)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="e.g. teacher.train.steps=2000 pairs.views=8 student.train.steps=1000 eval.n=500",
    )
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from pipeline.training import Interrupted

    try:
        return args.func(args)
    except NFMError as e:
        print(f"nfm: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"nfm: {e}; rerun the same command to resume", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("nfm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
