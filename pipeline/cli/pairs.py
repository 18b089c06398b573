"""`nfm pairs build | ls | prior | verify | rm | push | pull`."""

from __future__ import annotations

import argparse
import math
import time

from nfm.core.errors import NFMError
from nfm.pipeline.cli import options

SOLVERS = ["euler", "midpoint", "heun", "rk4", "dopri5"]


def cmd_build(args) -> int:
    """invert a teacher over a data set into a pair cache (or reuse it), or integrate a student (reflow)

    --teacher: z = encode(x + eta*eps) / sigma_f for every training image. --from-student RUN: x = ODE(z) for
    --n fresh noise draws z (reflow pairs), with --solver/--steps. Either way sharded safetensors in one
    format; a second build with the same inputs is a cache hit; an interrupted build resumes. Under
    `accelerate launch`/torchrun each process builds its own shards.
    """
    from nfm.core.config import format_table
    from nfm.core.data import load_data
    from nfm.core.distributed import process_state
    from nfm.pairs.build import PairsRunConfig, build_pairs
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
    # the pairs `nfm run --preset NAME` builds: NAME from --preset, else the data's own preset (digits: 32 views)
    from nfm.pipeline.presets import RUN_PRESETS, run_preset

    name = args.preset or next((n for n in (preset["data"].get("name"),) if n in RUN_PRESETS), None)
    if name:
        preset["pairs"] = dict(run_preset(name).get("pairs") or {})
    for flag in ("views", "dtype", "seed", "batch_size"):
        if getattr(args, flag) is not None:
            preset["pairs"][flag] = getattr(args, flag)
    cfg = options.configure(args, PairsRunConfig, preset)
    log = print if state.is_main_process else (lambda *a: None)
    log(format_table(cfg, "nfm pairs build"))
    data = load_data(cfg.data, cfg.pairs.split)
    log(data.describe())
    root = options.cache_root(args)
    result = build_pairs(teacher, data, cfg.pairs, root, teacher_info=info, log=log, verify=args.verify)
    log(f"key: {result.key}\npath: {result.path}")
    return 0


def _build_reflow(args) -> int:
    from nfm.core.config import format_table
    from nfm.core.distributed import process_state
    from nfm.pairs.build import PairBuildConfig
    from nfm.pairs.reflow import build_reflow_pairs
    from nfm.student.reflow import StudentGenerator

    if args.data or args.views or args.preset:
        raise NFMError("--data, --views and --preset are for teacher pairs; reflow pairs come from the student's noise")
    state = process_state()
    preset = {k: getattr(args, k) for k in ("dtype", "seed", "batch_size") if getattr(args, k) is not None}
    overrides = [o.removeprefix("pairs.") for o in args.overrides]
    cfg = options.configure(args, PairBuildConfig, preset, overrides)
    for flag in ("n", "steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise NFMError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    steps = 8 if args.steps is None else args.steps
    gen = StudentGenerator(args.from_student, state.device, args.solver or "heun", steps)
    n = 10_000 if args.n is None else args.n
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
    from nfm.pairs.prior import META_NAME, default_prior_dir

    cols = ["key", "kind", "teacher", "data", "rows", "views", "dtype", "size_mb", "complete", "origin", "prior"]
    rows = []
    for d in sorted(root.glob("*")) if root.is_dir() else []:
        if (d / INDEX_NAME).is_file():
            try:
                fitted = (default_prior_dir(d) / META_NAME).is_file()
                rows.append({**cache_summary(d), "prior": "fitted" if fitted else "-"})
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
    """check a cache: every shard against its index, then its pairs against the model you name

    The bytes: every claim of the index against the shards, every shard re-hashed, the key against the key
    fields. The pairs, with the model that made them (never one the cache names: nothing read from a cache is
    imported or run): teacher pairs are decoded with --teacher SPEC, reflow pairs regenerated with
    --from-student RUN, logits recomputed with --teacher RUN (the classifier), on a seeded sample of every shard
    (--all: every pair). A pulled cache stays marked foreign until this check passes.
    """
    from nfm.pairs.format import cache_kind, check_key, is_foreign, read_origin
    from nfm.pairs.lookup import find_cache
    from nfm.pairs.verify import mark_verified, require_intact

    cache_dir = find_cache(args.key, options.cache_root(args))
    t0 = time.perf_counter()
    index = require_intact(cache_dir)
    check_key(cache_dir, index)
    kind = cache_kind(index)
    took = time.perf_counter() - t0
    print(f"{len(index['shards'])} shards, {index['total_rows']} rows: checksums and key ok ({took:.1f}s)")
    _verify_prior(cache_dir)
    model = args.from_student if kind == "reflow" else args.teacher
    if args.from_student and kind != "reflow":
        raise NFMError(f"--from-student checks reflow pairs; {cache_dir.name} holds {kind} rows: use --teacher")
    if args.samples <= 0 and not args.all:
        model = None
    if model is None:
        flag = "--from-student RUN" if kind == "reflow" else "--teacher SPEC"
        recorded = (index.get("provenance") or {}).get("path") or (index.get("teacher") or {}).get("source", "?")
        print(
            f"pairs not checked against the model that made them: pass {flag} (this cache says it came from "
            f"{recorded}; nfm never loads what a cache names)"
        )
        if is_foreign(cache_dir):
            print(
                f"pair cache {cache_dir.name}: bytes OK; FOREIGN (from {read_origin(cache_dir)['source']}), unchecked"
            )
        else:
            print(f"pair cache {cache_dir.name}: bytes OK")
        return 0
    how = _check_against(args, cache_dir, index, kind)
    mark_verified(cache_dir, how)
    print(f"pair cache {cache_dir.name}: OK")
    return 0


def _verify_prior(cache_dir) -> None:
    """The cache's fitted prior, if it has one: its checksum and its cache key checked, its statistics in a line."""
    from nfm.core.prior import describe
    from nfm.pairs.prior import META_NAME, default_prior_dir, load_prior

    d = default_prior_dir(cache_dir)
    if (d / META_NAME).is_file():
        _, meta = load_prior(d, cache_dir.name)
        print(f"fitted prior {meta['key']}: checksum ok; {describe(meta['components'])}")


def _check_against(args, cache_dir, index: dict, kind: str) -> dict:
    """Check the pairs with the user's model; print and return what was checked."""
    from nfm.teacher.protocol import load_teacher_spec

    dev = options.device(args)
    samples = None if args.all else args.samples
    if kind == "reflow":
        from nfm.pairs.reflow import check_regeneration
        from nfm.student.reflow import StudentGenerator

        solver, steps, guidance = _reflow_settings(index.get("provenance") or {})
        gen = StudentGenerator(args.from_student, dev, solver, steps, guidance)
        how = check_regeneration(cache_dir, gen, dev, None if args.all else 1, args.tolerance)
        print(
            f"regenerated {how['pairs_checked']} pairs through the student ({solver}): worst |x - stored| "
            f"= {how['worst_abs_error']:.3g}, noise identical"
        )
    elif kind == "kt":
        from nfm.pairs.kt import check_logits
        from nfm.teacher.classifier import load_classifier

        how = check_logits(cache_dir, load_classifier(args.teacher, dev)[0], samples, args.tolerance)
        print(
            f"teacher logits recomputed for {how['rows_checked']} rows: worst |difference| {how['worst_abs_error']:.3g}"
        )
    else:
        from nfm.pairs.verify import check_reconstruction

        teacher, _ = load_teacher_spec(args.teacher, dev, args.teacher_arch)
        how = check_reconstruction(cache_dir, teacher, samples, args.tolerance)
        print(
            f"reconstruction on {how['pairs_checked']} pairs: worst |decode(noise*sigma_f) - (x + eta*eps)| = "
            f"{how['worst_abs_error']:.3g} (mean of per-pair max {how['mean_max_abs_error']:.3g}; "
            f"noise stored as {index['dtypes']['noise']})"
        )
    return how


def _reflow_settings(prov: dict) -> tuple[str, int, float]:
    """The solver settings a reflow cache records, checked as data (they only choose among our own solvers)."""
    import math

    solver, steps, guidance = prov.get("solver"), prov.get("steps") or 32, prov.get("guidance", 0.0)
    if solver not in SOLVERS or not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise NFMError(f"the reflow cache records solver {solver!r} with steps {steps!r}: not settings nfm made")
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise NFMError(f"the reflow cache records guidance {guidance!r}: not a setting nfm made")
    return solver, steps, float(guidance)


def cmd_prior(args) -> int:
    """fit (once) and show the Gaussian prior of a cache's noise, per class

    The prior a student of these pairs is sampled from (`student.sample.prior`, `nfm teacher sample --prior
    fitted`): per class the mean and the OAS-shrunk covariance of the noise (--model full), or its top --rank
    principal directions plus a diagonal (--model lowrank, for images whose covariance a class would not fit in
    memory; auto, the default, chooses), and one component pooled over every row. Fitted on first use and stored
    beside the cache (CACHE_ROOT/../priors/KEY); this command fits it ahead of time and prints what it is against
    N(0, I): rows, mean norm, the range of the variances and of the covariance eigenvalues, KL to N(0, I) in nats.
    Students and teachers sample from the default (auto) fit.
    """
    from nfm.pairs.lookup import find_cache
    from nfm.pairs.prior import PriorConfig, fit_prior, prior_dir
    from nfm.pairs.reader import FLOW_KINDS, PairCache

    cache = PairCache(find_cache(args.key, options.cache_root(args)), kinds=FLOW_KINDS, reader="a fitted prior")
    pcfg = PriorConfig(per_class=not args.pooled, model=args.model, rank=args.rank)
    _, meta = fit_prior(cache, pcfg)
    comps = meta["components"]
    names = [f"class {c}" for c in range(len(comps) - 1)] + ["pooled"]
    last = "shrinkage" if meta["model"] == "gaussian-oas" else "rank"
    cols = ["component", "rows", "mean_norm", "var_min", "var_max", "eig_min", "eig_max", "kl_to_standard", last]
    _print_table([{"component": n, **c} for n, c in zip(names, comps)], cols)
    dim = math.prod(meta["shape"])
    print(f"{meta['model']} prior {meta['key']} of pair cache {cache.key} ({dim} dimensions): {prior_dir(cache, pcfg)}")
    return 0


def cmd_rm(args) -> int:
    """delete a pair cache (only a cache under the cache root, and only its own files)"""
    from filelock import FileLock, Timeout

    from nfm.pairs.lookup import removable_cache, remove_cache

    cache_dir = removable_cache(args.key, options.cache_root(args))
    lock_path = cache_dir.parent / f".{cache_dir.name}.lock"
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise NFMError(f"pair cache {cache_dir.name} is being built by another process; remove it afterwards") from None
    try:
        left = remove_cache(cache_dir)
        lock_path.unlink(missing_ok=True)
    finally:
        lock.release()
    if left:
        print(f"removed the cache files of {cache_dir}; left {len(left)} other entries there: {', '.join(left[:5])}")
    else:
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
    from nfm.core.hub import hub_snapshot, is_repo_id
    from nfm.pairs.share import install_cache

    if not is_repo_id(args.repo_id):
        raise NFMError(f"{args.repo_id!r} is not a Hugging Face Hub repo id (owner/name)")
    origin = f"hub:{args.repo_id}" + (f"@{args.revision}" if args.revision else "")
    snapshot = hub_snapshot(args.repo_id, args.revision, repo_type="dataset")
    dst = install_cache(snapshot, options.cache_root(args), origin)
    print(
        f"pair cache {dst.name} installed at {dst} (every byte matches its index). It is marked foreign until "
        f"checked against its teacher: nfm pairs verify {dst.name[:8]} --teacher SPEC. Train on it with --pairs "
        f"{dst.name[:8]}"
    )
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
    p.add_argument("--solver", choices=SOLVERS, help="reflow solver (default heun)")
    p.add_argument("--steps", type=int, help="reflow: steps of a fixed-step solver (default 8)")
    options.add_teacher_arch(p)
    p.add_argument("--data", help="data source (default: the teacher's own; required for ml-tarflow/python teachers)")
    p.add_argument(
        "--preset",
        help="the pairs settings of `nfm run --preset NAME` (default: the preset named like the data, e.g. digits: "
        "32 views; data without one: 1 view)",
    )
    p.add_argument("--views", type=int, help="noise draws per image (default: the preset's)")
    p.add_argument("--dtype", choices=["float16", "float32"], help="noise storage dtype (default float16)")
    p.add_argument("--seed", type=int, help="seed of the per-row noise (default 0)")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="encode batch (default 256)")
    p.add_argument("--verify", action="store_true", help="on a cache hit, re-hash every shard's content too")
    options.add_cache_dir(p)
    options.add_config_layers(p, "pairs.shard_mb=64 data.held_out=0.1")

    p = options.add_command(sub, "ls", cmd_ls)
    options.add_cache_dir(p)

    p = options.add_command(sub, "prior", cmd_prior)
    p.add_argument("key", help="cache key, unique key prefix, or cache directory")
    p.add_argument("--pooled", action="store_true", help="one Gaussian over every row, not one per class")
    p.add_argument(
        "--model",
        choices=("auto", "full", "lowrank"),
        default="auto",
        help="full covariance, low-rank + diagonal, or auto: full where it fits in memory (default)",
    )
    p.add_argument("--rank", type=int, default=64, help="lowrank: principal directions kept (default 64)")  # fmt: skip
    options.add_cache_dir(p)

    p = options.add_command(sub, "verify", cmd_verify)
    p.add_argument("key", help="cache key, unique key prefix, or cache directory")
    p.add_argument("--teacher", metavar="SPEC", help="the teacher to check teacher pairs with (or the classifier RUN)")
    options.add_teacher_arch(p)
    p.add_argument("--from-student", dest="from_student", metavar="RUN", help="the student to regenerate reflow pairs")
    p.add_argument("--samples", type=int, default=64, help="pairs checked, spread over every shard (0: bytes only)")
    p.add_argument("--all", action="store_true", help="check every pair (reflow: every build batch)")
    p.add_argument("--tolerance", type=float, default=0.1, help="worst error allowed (default 0.1)")
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
