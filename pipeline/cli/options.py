"""Options that several commands share, declared once."""

from __future__ import annotations

import argparse
import inspect
import time
from pathlib import Path

SPEC_HELP = "teacher run/export directory, ml-tarflow:PATH.pth, or python:package.module:factory"
ARCH_HELP = (
    "architecture of an ml-tarflow / python teacher as key=value,... e.g. "
    "patch_size=8,in_channels=3,noise_std=0.07,num_classes=0 (ml-tarflow: inferred from shapes and file name "
    "where possible; python: passed to the factory)"
)


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def add_cache_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir",
        help="pair-cache root, or a folder like $NFM_CACHE_DIR that holds pairs/ (default: $NFM_CACHE_DIR/pairs or "
        "~/.cache/nfm/pairs)",
    )


def add_teacher_arch(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher-arch", metavar="K=V,...", help=ARCH_HELP)


def add_config_layers(p: argparse.ArgumentParser, overrides_example: str, run_dir_help: str | None = None) -> None:
    """--config FILE, optionally --run-dir DIR, and the positional key=value overrides."""
    p.add_argument("--config", metavar="FILE", help="config file (JSON or TOML) layered over the preset")
    if run_dir_help:
        p.add_argument("--run-dir", metavar="DIR", help=run_dir_help)
    p.add_argument("--print-config", action="store_true", help="print the resolved config (preset < file < overrides) "
                   "and stop")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {overrides_example}")


def configure(args: argparse.Namespace, cls, preset: dict, overrides: list[str] | None = None):
    """The command's config: preset < --config FILE < key=value overrides (default: the command line's). With
    --print-config: printed, and the command stops there (exit 0) before any work."""
    from nfm.core.config import build_config, format_table

    cfg = build_config(
        cls, preset=preset, file=args.config, overrides=args.overrides if overrides is None else overrides
    )
    if getattr(args, "print_config", False):
        print(format_table(cfg, f"nfm {args.stage} {getattr(args, 'command', '')}".rstrip() + " (resolved config)"))
        raise SystemExit(0)
    return cfg


def add_preset(p: argparse.ArgumentParser, names, default: str = "digits") -> None:
    p.add_argument("--preset", default=default, help=f"named preset: {', '.join(names)} (default: {default})")


def add_sample_outputs(p: argparse.ArgumentParser, default_n: int = 100) -> None:
    """--n, --label, --seed, --out, --device of the `sample` commands."""
    p.add_argument("--n", type=int, default=default_n, help=f"number of samples (default {default_n})")
    p.add_argument("--label", type=int, help="class of every sample (default: cycle through the classes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    p.add_argument("--out", help="output path without suffix (writes .png and .safetensors)")
    add_device(p)


def add_quiet(p: argparse.ArgumentParser, default=argparse.SUPPRESS) -> None:
    """-q/--quiet, before or after the command (`nfm -q run`, `nfm run -q`): SUPPRESS keeps a command's parser
    from resetting what the top level parsed."""
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help="no progress bars or config tables: warnings, errors and the result only (RUN/log.txt keeps "
        "every line; or NFM_QUIET=1)",
    )


def add_group(stages: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """`nfm NAME COMMAND`: the group's parser; returns its subcommand registry."""
    group = stages.add_parser(name, help=help)
    return group.add_subparsers(dest="command", required=True, metavar="COMMAND")


def add_command(sub: argparse._SubParsersAction, name: str, func) -> argparse.ArgumentParser:
    """A command whose help is the first paragraph of `func`'s docstring and whose description is the rest."""
    first, _, rest = inspect.cleandoc(func.__doc__ or "").partition("\n\n")
    p = sub.add_parser(name, help=" ".join(first.split()), description=" ".join(rest.split()) or None)
    p.set_defaults(func=func, parser=p)  # parser: the command's own, for its usage in errors
    add_quiet(p)
    return p


def write_result(path: Path, result: dict) -> int:
    """An evaluation command's result: written as JSON, echoed, and where it went."""
    import json

    from nfm.core.io import write_json

    write_json(path, result)
    print(json.dumps(result, indent=2))
    print(f"written: {path}")
    return 0


def device(args: argparse.Namespace):
    from nfm.core.distributed import default_device

    return default_device(getattr(args, "device", None))


def cache_root(args: argparse.Namespace) -> Path:
    """--cache-dir X: the folder of the pair caches. X may also be what NFM_CACHE_DIR names (its caches in
    X/pairs): where X holds no cache of its own and X/pairs is a folder, that is the one meant."""
    from nfm.pairs.format import INDEX_NAME
    from nfm.pairs.lookup import default_cache_root

    if not getattr(args, "cache_dir", None):
        return default_cache_root()
    root = Path(args.cache_dir).expanduser()
    own = root.is_dir() and any((d / INDEX_NAME).is_file() for d in root.iterdir() if d.is_dir())
    return root / "pairs" if (root / "pairs").is_dir() and not own else root


def finished(kind: str, t0: float, run_dir: Path, export: Path) -> int:
    """Where a training command left its export and newest sample grid (main process only)."""
    from nfm.core.distributed import process_state

    if process_state().is_main_process:
        print(f"done in {time.perf_counter() - t0:.0f}s. {kind} export: {export}")
        samples = sorted((run_dir / "samples").glob("*.png"))
        if samples:
            print(f"samples: {samples[-1]}")
    return 0


def samples_path(args: argparse.Namespace, run_dir: Path, name: str) -> Path:
    """--out, else RUN/samples/NAME (no suffix)."""
    return (Path(args.out) if args.out else run_dir / "samples" / name).with_suffix("")
