"""`nfm teacher train | sample | eval | import`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from nfm.core.errors import NFMError
from nfm.pipeline.cli import options


def cmd_train(args) -> int:
    """train (or resume) a TarFlow teacher

    Train a TarFlow teacher by maximum likelihood on x + eta * eps. Rerunning the same command resumes from the
    newest checkpoint.
    """
    from nfm.core.config import _merge
    from nfm.pipeline.presets import size_overrides, teacher_preset
    from nfm.teacher.train import TeacherRunConfig, run_teacher_training

    preset = teacher_preset(args.preset)
    if args.size:
        preset = _merge(preset, size_overrides(args.size))
    cfg = options.configure(args, TeacherRunConfig, preset)
    run_dir = Path(args.run_dir or f"runs/teacher-{args.preset}")
    t0 = time.perf_counter()
    return options.finished("teacher", t0, run_dir, run_teacher_training(cfg, run_dir))


def cmd_sample(args) -> int:
    """sample images from a trained teacher"""
    from nfm.core.sampling import sample_inputs, save_samples
    from nfm.teacher.export import load_teacher, resolve_export_dir
    from nfm.teacher.model import Guidance

    device = options.device(args)
    model = load_teacher(args.run, device)
    prior = args.temperature * model.prior_std.cpu()
    if args.prior == "fitted":
        if not args.pairs:
            raise NFMError("--prior fitted: the Gaussian fitted to a pair cache of this teacher; add --pairs KEY")
        from nfm.pairs.lookup import find_cache
        from nfm.pairs.prior import teacher_prior
        from nfm.pairs.reader import PairCache

        cache = PairCache(find_cache(args.pairs, options.cache_root(args)), kinds=("teacher",), reader="--prior fitted")
        fitted = teacher_prior(cache, model.fingerprint())
        prior = fitted.scaled(fitted.scale * prior)
    elif args.pairs:
        raise NFMError("--pairs names the cache whose fitted prior --prior fitted samples from: add --prior fitted")
    inputs = sample_inputs(
        args.n,
        model.image_shape,
        model.num_classes,
        seed=args.seed,
        prior=prior,
        label=args.label,
        device=device,
    )
    guidance = Guidance(args.guidance, annealed=args.annealed, attn_temp=args.attn_temp)
    t0, stats = time.perf_counter(), {}
    x = model.decode(
        inputs.z, inputs.y, guidance=guidance, method=args.decoder, tol=args.tol, chunk=args.chunk,
        max_iters=args.max_iters, stats=stats,
    )  # fmt: skip
    if args.decoder == "jacobi":
        print(f"jacobi iterations per block: {stats['iterations']} (sequential: {model.cfg.num_patches - 1} steps)")
    if not args.no_denoise and model.noise_std > 0:
        x = model.denoise(x, inputs.y)
    dt = time.perf_counter() - t0
    base = options.samples_path(args, resolve_export_dir(args.run).parent, "sample")
    png = save_samples(x, inputs, model.num_classes, base, tensors=True)
    print(f"{args.n} samples in {dt:.1f}s ({args.n / dt:.1f} img/s) -> {png}, {base.with_suffix('.safetensors')}")
    return 0


def cmd_import(args) -> int:
    """convert a pretrained teacher (an apple/ml-tarflow .pth) into this project's export

    Loads an ml-tarflow state dict with torch.load(weights_only=True), maps it exactly onto this project's TarFlow
    and writes model.safetensors + config.json: a teacher export that `nfm pairs build --teacher DIR` and `nfm run
    --from-teacher DIR` take. The architecture comes from the tensor shapes, the file name
    ({data}_model_{patch}_{width}_{blocks}_{layers}_{eta}.pth) and --teacher-arch.
    """
    from dataclasses import asdict

    from nfm.core.config import build_config
    from nfm.core.data import DataConfig
    from nfm.teacher.export import save_export
    from nfm.teacher.protocol import load_teacher_spec, parse_spec

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


def cmd_eval(args) -> int:
    """bits/dim of a trained teacher on held-out data"""
    from nfm.core.config import from_dict
    from nfm.core.data import DataConfig, load_data
    from nfm.teacher.export import export_info, load_teacher, resolve_export_dir
    from nfm.teacher.train import evaluate_bpd

    model = load_teacher(args.run, options.device(args))
    info = export_info(args.run)
    data_cfg = from_dict(DataConfig, {**info.get("data", {}), **({"name": args.data} if args.data else {})})
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
    return options.write_result(out, result)


def register(stages: argparse._SubParsersAction) -> None:
    from nfm.pipeline.presets import TEACHER_PRESETS
    from nfm.teacher.sizes import DECODERS, TARFLOW_SIZES

    sub = options.add_group(stages, "teacher", "stage one: the TarFlow teacher")

    p = options.add_command(sub, "train", cmd_train)
    options.add_preset(p, TEACHER_PRESETS)
    options.add_config_layers(
        p,
        "train.steps=500 model.width=64 data.name=fashion-mnist",
        "run directory (default: runs/teacher-PRESET); an existing one is resumed",
    )
    p.add_argument("--size", help=f"named TarFlow size ({', '.join(TARFLOW_SIZES)}), applied before overrides")

    p = options.add_command(sub, "sample", cmd_sample)
    p.add_argument("run", help="teacher run directory or export directory")
    options.add_sample_outputs(p)
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight (default 0)")
    p.add_argument("--annealed", action="store_true", help="anneal guidance linearly over the patches")
    p.add_argument("--attn-temp", type=float, default=1.0, help="attention temperature of the unguided branch")
    p.add_argument("--temperature", type=float, default=1.0, help="prior temperature (default 1)")
    p.add_argument(
        "--prior", choices=("gaussian", "fitted"), default="gaussian",
        help="gaussian: N(0, I) (default); fitted: the Gaussian fitted per class to the noise of --pairs KEY (a pair "
        "cache of this teacher: the encodings a student of it trains on)",
    )  # fmt: skip
    p.add_argument("--pairs", help="with --prior fitted: the pair cache (key, prefix or directory) to fit it to")
    options.add_cache_dir(p)
    p.add_argument("--no-denoise", action="store_true", help="skip the score denoising step")
    p.add_argument(
        "--decoder",
        choices=DECODERS,
        default="sequential",
        help="sequential (KV-cached, patch by patch; default) or jacobi (parallel fixed-point iteration)",
    )
    p.add_argument("--tol", type=float, default=1e-4, help="jacobi: stop when the largest change is below this")
    p.add_argument("--chunk", type=int, default=0, help="jacobi: patches per Gauss-Seidel chunk (0: all)")
    p.add_argument("--max-iters", type=int, default=0, help="jacobi: iteration cap per chunk (0: chunk length, exact)")

    p = options.add_command(sub, "eval", cmd_eval)
    p.add_argument("run", help="teacher run directory or export directory")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--data", help="evaluate on another data source (default: the teacher's own)")
    p.add_argument("--batch-size", type=int, default=500)
    options.add_device(p)

    p = options.add_command(sub, "import", cmd_import)
    p.add_argument(
        "spec", metavar="ml-tarflow:PATH", help="the checkpoint, e.g. ml-tarflow:afhq_model_8_768_8_8_0.07.pth"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="export directory to write")
    options.add_teacher_arch(p)
    p.add_argument("--data", help="the data set it models (recorded so pairs build needs no --data)")
