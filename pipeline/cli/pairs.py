"""`nfm pairs build | ls | verify | rm`."""

from __future__ import annotations

import argparse
import time

from nfm.pipeline.cli import options
from nfm.pipeline.core.errors import NFMError


def cmd_build(args) -> int:
    """invert a teacher over a data set into a pair cache (or reuse it), or integrate a student (reflow)

    --teacher: z = encode(x + eta*eps) / sigma_f for every training image. --from-student RUN: x = ODE(z) for
    --n fresh noise draws z (reflow pairs), with --solver/--steps. Either way sharded safetensors in one
    format; a second build with the same inputs is a cache hit; an interrupted build resumes. Under
    `accelerate launch`/torchrun each process builds its own shards.
    """
    from nfm.pairs.build import PairsRunConfig, build_pairs
    from nfm.pipeline.core.config import build_config, format_table
    from nfm.pipeline.core.data import load_data
    from nfm.pipeline.core.distributed import process_state
    from nfm.teacher.protocol import load_teacher_spec

    if bool(args.teacher) == bool(args.from_student):
        raise NFMError("give one of --teacher SPEC (teacher pairs) or --from-student RUN (reflow pairs)")
    if args.from_student:
        return _build_reflow(args)
    for flag in ("n", "solver", "steps"):
        if getattr(args, flag) is not None:
            raise NFMError(f"--{flag} is for reflow pairs (--from-student RUN); a teacher encodes every image")
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
    root = options.cache_root(args)
    result = build_pairs(teacher, data, cfg.pairs, root, teacher_info=info, log=log, verify=args.verify)
    log(f"key: {result.key}\npath: {result.path}")
    return 0


def _build_reflow(args) -> int:
    from nfm.pairs.build import PairBuildConfig
    from nfm.pairs.reflow import build_reflow_pairs
    from nfm.pipeline.core.config import build_config, format_table
    from nfm.pipeline.core.distributed import process_state
    from nfm.student.reflow import StudentGenerator

    if args.data or args.views:
        raise NFMError("--data and --views are for teacher pairs; reflow pairs come from the student's noise")
    state = process_state()
    preset = {k: getattr(args, k) for k in ("dtype", "seed", "batch_size") if getattr(args, k) is not None}
    overrides = [o.removeprefix("pairs.") for o in args.overrides]
    cfg = build_config(PairBuildConfig, preset=preset, file=args.config, overrides=overrides)
    gen = StudentGenerator(args.from_student, state.device, args.solver or "heun", args.steps or 8)
    n = args.n or 10_000
    log = print if state.is_main_process else (lambda *a: None)
    log(format_table(cfg, f"nfm pairs build --from-student {args.from_student} ({n} pairs, {gen.solver})"))
    result = build_reflow_pairs(gen, n, cfg, options.cache_root(args), log=log, verify=args.verify)
    if gen.nfe:
        log(f"NFE per solve: mean {sum(gen.nfe) / len(gen.nfe):.1f} over {len(gen.nfe)} batches")
    log(f"key: {result.key}\npath: {result.path}")
    return 0


def _print_table(rows: list[dict], cols: list[str]) -> None:
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(width[c]) for c in cols))


def cmd_ls(args) -> int:
    """list the pair caches"""
    from nfm.pairs.build import cache_summary
    from nfm.pairs.format import INDEX_NAME

    root = options.cache_root(args)
    cols = ["key", "teacher", "data", "rows", "views", "dtype", "size_mb", "complete"]
    rows = []
    for d in sorted(root.glob("*")) if root.is_dir() else []:
        if (d / INDEX_NAME).is_file():
            try:
                rows.append(cache_summary(d))
            except NFMError as e:
                rows.append({**dict.fromkeys(cols, ""), "key": d.name, "teacher": "?", "data": f"unreadable: {e}"})
                rows[-1]["complete"] = False
    if not rows:
        print(f"no pair caches under {root}")
        return 0
    _print_table(rows, cols)
    print(f"({len(rows)} caches under {root})")
    return 0


def cmd_verify(args) -> int:
    """check every claim of the index against the shards, re-hash them, and check reconstruction through the teacher"""
    from nfm.pairs.format import read_index
    from nfm.pairs.lookup import find_cache
    from nfm.pairs.verify import check_shards, reconstruction_error
    from nfm.teacher.protocol import load_teacher_spec

    cache_dir = find_cache(args.key, options.cache_root(args))
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
    prov = index.get("provenance") or {}
    if args.samples > 0 and prov.get("kind") == "student":
        from nfm.pairs.reflow import regeneration_error
        from nfm.student.reflow import StudentGenerator

        dev = options.device(args)
        gen = StudentGenerator(prov["path"], dev, prov["solver"], prov.get("steps") or 32, prov.get("guidance", 0.0))
        rec = regeneration_error(cache_dir, gen, dev)
        print(
            f"regenerated {rec['pairs_checked']} pairs through the student ({prov['solver']}): worst |x - stored| "
            f"= {rec['worst_abs_error']:.3g}, noise {'identical' if rec['noise_equal'] else 'DIFFERENT'}"
        )
        if rec["worst_abs_error"] > args.tolerance or not rec["noise_equal"]:
            raise NFMError(f"regeneration error {rec['worst_abs_error']:.3g} exceeds --tolerance {args.tolerance}")
    elif args.samples > 0 and index.get("kind") == "kt":
        from nfm.pairs.kt import logit_error
        from nfm.teacher.classifier import load_classifier

        source = args.teacher or index["teacher"].get("source")
        if not source:
            raise NFMError("the cache does not record its classifier; pass --teacher RUN to check its logits")
        rec = logit_error(cache_dir, load_classifier(source, options.device(args))[0], args.samples)
        worst = rec["worst_abs_error"]
        print(f"teacher logits recomputed for {rec['rows_checked']} rows: worst |difference| {worst:.3g}")
        if rec["worst_abs_error"] > args.tolerance:
            raise NFMError(f"logit difference {rec['worst_abs_error']:.3g} exceeds --tolerance {args.tolerance}")
    elif args.samples > 0:
        source = args.teacher or index["teacher"].get("source")
        if not source:
            raise NFMError("the cache does not record its teacher; pass --teacher PATH to check reconstruction")
        arch = None if args.teacher else index["teacher"].get("arch")
        teacher, _ = load_teacher_spec(source, options.device(args), arch or None)
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


def cmd_rm(args) -> int:
    """delete a pair cache"""
    import shutil

    from filelock import FileLock, Timeout

    from nfm.pairs.lookup import find_cache

    cache_dir = find_cache(args.key, options.cache_root(args))
    lock_path = cache_dir.parent / f".{cache_dir.name}.lock"
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise NFMError(f"pair cache {cache_dir.name} is being built by another process; remove it afterwards") from None
    try:
        shutil.rmtree(cache_dir)
        lock_path.unlink(missing_ok=True)
    finally:
        lock.release()
    print(f"removed {cache_dir}")
    return 0


def cmd_push(args) -> int:
    """upload a pair cache to a Hugging Face Hub dataset repo (every shard checked first)"""
    from nfm.pairs.lookup import find_cache
    from nfm.pairs.share import push_cache

    cache_dir = find_cache(args.key, options.cache_root(args))
    print(push_cache(cache_dir, args.repo_id, private=args.private))
    return 0


def cmd_pull(args) -> int:
    """download a pair cache from a Hugging Face Hub dataset repo, check every byte, install it under its key"""
    from nfm.pairs.share import install_cache
    from nfm.pipeline.core.hub import hub_snapshot, is_repo_id

    if not is_repo_id(args.repo_id):
        raise NFMError(f"{args.repo_id!r} is not a Hugging Face Hub repo id (owner/name)")
    dst = install_cache(hub_snapshot(args.repo_id, args.revision, repo_type="dataset"), options.cache_root(args))
    print(f"pair cache {dst.name} installed at {dst}; train on it with --pairs {dst.name[:8]}")
    return 0


def register(stages: argparse._SubParsersAction) -> None:
    sub = options.add_group(stages, "pairs", "stage two: the teacher's noise/data pair cache")

    p = options.add_command(sub, "build", cmd_build)
    p.add_argument("--teacher", metavar="SPEC", help=options.SPEC_HELP)
    p.add_argument("--from-student", dest="from_student", metavar="RUN", help="reflow: integrate this student run")
    p.add_argument(
        "--n",
        "--num-pairs",
        type=int,
        dest="n",
        help="reflow: number of pairs (default 10000; --num-pairs under torchrun)",
    )
    p.add_argument(
        "--solver", choices=["euler", "midpoint", "heun", "rk4", "dopri5"], help="reflow solver (default heun)"
    )
    p.add_argument("--steps", type=int, help="reflow: steps of a fixed-step solver (default 8)")
    options.add_teacher_arch(p)
    p.add_argument("--data", help="data source (default: the teacher's own; required for ml-tarflow/python teachers)")
    p.add_argument("--views", type=int, help="noise draws per image (default 1)")
    p.add_argument("--dtype", choices=["float16", "float32"], help="noise storage dtype (default float16)")
    p.add_argument("--seed", type=int, help="seed of the per-row noise (default 0)")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="encode batch (default 256)")
    p.add_argument("--verify", action="store_true", help="on a cache hit, re-hash every shard's content too")
    options.add_cache_dir(p)
    options.add_config_layers(p, "pairs.shard_mb=64 data.held_out=0.1")

    p = options.add_command(sub, "ls", cmd_ls)
    options.add_cache_dir(p)

    p = options.add_command(sub, "verify", cmd_verify)
    p.add_argument("key", help="cache key, unique key prefix, or cache directory")
    p.add_argument("--samples", type=int, default=64, help="pairs decoded for the reconstruction check (0: skip)")
    p.add_argument("--tolerance", type=float, default=0.1, help="worst reconstruction error allowed (default 0.1)")
    p.add_argument("--teacher", metavar="SPEC", help="teacher to decode with (default: the one recorded in the cache)")
    options.add_cache_dir(p)
    options.add_device(p)

    p = options.add_command(sub, "rm", cmd_rm)
    p.add_argument("key", help="cache key, unique key prefix, or cache directory")
    options.add_cache_dir(p)

    p = options.add_command(sub, "push", cmd_push)
    p.add_argument("key", help="cache key, unique key prefix, or cache directory")
    p.add_argument("repo_id", help="Hub dataset repo, owner/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    options.add_cache_dir(p)

    p = options.add_command(sub, "pull", cmd_pull)
    p.add_argument("repo_id", help="Hub dataset repo written by `nfm pairs push`, owner/name")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    options.add_cache_dir(p)
