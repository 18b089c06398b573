"""`nfm doctor`: what this installation has and can do, in one report to paste into a bug report."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
from importlib import metadata
from pathlib import Path

from nfm.pipeline.cli import options

PACKAGES = ("torch", "torchvision", "accelerate", "datasets", "safetensors", "torchdiffeq", "torch-fidelity", "einops",
            "huggingface_hub", "numpy", "scipy", "POT", "tensorboard", "wandb")  # fmt: skip
BUILTIN_DATA = ("digits", "fashion-mnist", "mnist-5k")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> list[str]:
    import torch

    lines = [f"CPU: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("CUDA: none (training and sampling run on the CPU)")
    return lines


def _caches(root: Path) -> list[str]:
    """Each pair cache under root: kind, rows, size, complete, origin — from its index (no re-hashing: `nfm pairs
    verify KEY` does that)."""
    from nfm.core.errors import NFMError
    from nfm.pairs.build import cache_summary
    from nfm.pairs.format import INDEX_NAME, check_key, read_index

    lines, dirs = [], sorted(d for d in root.iterdir() if (d / INDEX_NAME).is_file()) if root.is_dir() else []
    for d in dirs:
        try:
            check_key(d, read_index(d))
            s = cache_summary(d)
            state = "complete" if s["complete"] else "INCOMPLETE (rerun its build to finish it)"
            lines.append(f"  {s['key']}  {s['kind']:<7} {s['rows']:>9} rows  {s['size_mb']:>9.1f} MB  {state}, "
                         f"{s['origin']}")  # fmt: skip
        except NFMError as e:
            lines.append(f"  {d.name}  UNREADABLE: {e}")
    return lines or ["  (none)"]


def _data() -> list[str]:
    from nfm.core.data import DataConfig, load_data
    from nfm.core.errors import NFMError

    lines = []
    for name in BUILTIN_DATA:
        try:
            test = load_data(DataConfig(name=name), "test")
            c, h, w = test.image_shape
            lines.append(f"  {name:<14} found: {c}x{h}x{w}, {test.num_classes} classes, {len(test)} held-out images")
        except NFMError as e:
            lines.append(f"  {name:<14} missing: {e}")
    return lines


def _feature_networks() -> list[str]:
    from nfm.core.errors import NFMError
    from nfm.pipeline.evaluate import INCEPTION, RECIPES, check_extractor

    lines = []
    for name in [f"nfm-{d}" for d in RECIPES] + [INCEPTION]:
        try:
            dim = check_extractor(name)
            lines.append(f"  {name:<26} installed ({dim}-d features)")
        except NFMError as e:
            lines.append(f"  {name:<26} missing: {e}")
    return lines


def cmd_doctor(args) -> int:
    """what this installation has: versions, devices, the cache root and its caches, data sets, FID networks

    The first thing to paste into a bug report. Reads indexes and files; re-hashes nothing and trains nothing
    (`nfm pairs verify KEY` checks a cache's bytes).
    """
    import nfm
    from nfm.core.data import hub_unreachable
    from nfm.pairs.lookup import default_cache_root

    root = options.cache_root(args)
    where = Path(nfm.__file__).resolve().parent.parent
    print(f"nfm {nfm.__version__} ({where}); python {platform.python_version()} on {platform.platform()}")
    print("packages: " + ", ".join(f"{p} {_version(p)}" for p in PACKAGES))
    print("devices:\n  " + "\n  ".join(_devices()))
    env = {k: os.environ[k] for k in ("NFM_CACHE_DIR", "HF_HOME", "HF_HUB_OFFLINE", "NFM_INCEPTION_WEIGHTS")
           if k in os.environ}  # fmt: skip
    print("environment: " + (", ".join(f"{k}={v}" for k, v in env.items()) or "(no NFM_* / HF_* settings)"))
    free = shutil.disk_usage(root if root.exists() else root.parent if root.parent.exists() else Path.home()).free
    default = " (the default)" if root == default_cache_root() else ""
    print(f"pair caches under {root}{default}, {free / 2**30:.1f} GiB free there:")
    print("\n".join(_caches(root)))
    print("built-in data:\n" + "\n".join(_data()))
    print("FID feature networks:\n" + "\n".join(_feature_networks()))
    hub = hub_unreachable(timeout=3.0) if args.network else None
    if args.network:
        print(f"Hugging Face Hub: {'unreachable (' + hub + ')' if hub else 'reachable (or offline mode is set)'}")
    sys.stdout.flush()
    return 0


def register(stages: argparse._SubParsersAction) -> None:
    p = options.add_command(stages, "doctor", cmd_doctor)
    p.add_argument("--network", action="store_true", help="also try one connection to the Hugging Face Hub (3 s)")
    options.add_cache_dir(p)
