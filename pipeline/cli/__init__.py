"""The `nfm` command: one module per command group, each registering its subcommands.

    nfm teacher train  [--preset digits] [--config FILE] [--run-dir DIR] [--size NAME] [key=value ...]
    nfm teacher sample RUN [--n 100] [--guidance W] [--temperature T] [--no-denoise] [--out PNG]
    nfm teacher eval   RUN [--split test]
    nfm teacher import ml-tarflow:PATH.pth --out DIR [--teacher-arch k=v,...] [--data NAME]
    nfm pairs build    --teacher RUN|ml-tarflow:PATH|python:mod:factory [--data NAME] [--views K] [key=value ...]
    nfm pairs ls | verify KEY | rm KEY | push KEY OWNER/NAME | pull OWNER/NAME
    nfm student train  [--preset digits] [--coupling nfm|independent|minibatch-ot|...] [--pairs KEY]
                       [--objective fm|meanflow|shortcut] [key=value ...]
    nfm student sample RUN [--solver auto|euler|midpoint|heun|rk4|mean|dopri5] [--steps 4] [--grid uniform|data-end]
    nfm student eval   RUN [--split test] [--eta 0.1] [--hutchinson K]
    nfm run            [--preset digits] [--from-teacher SPEC] [--seeds N] [--first-seed K] [key=value ...]
    nfm report render RUN | merge RUN... --out DIR
    nfm kt teacher train | pairs build --teacher RUN | eval RUN
    nfm kt student train --pairs KEY [--method none|kd|fm-kt|ofm-kt] [--schedule rf|vp|ve] [--kd-loss kl|dist]
    nfm kt run         [--preset fashion-mnist] [--seeds 3] [key=value ...]

Every entry point takes a preset, a config file (JSON/TOML) and `section.key=value` overrides,
and prints the resolved config. Rerunning a training command resumes it.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from nfm.core.errors import NFMError


def build_parser() -> argparse.ArgumentParser:
    from nfm.pipeline.cli import doctor, kt, options, pairs, report, run, student, teacher

    parser = argparse.ArgumentParser(prog="nfm", description="Normalized Flow Matching: teacher, pairs, student.")
    from nfm import __version__

    parser.add_argument("--version", action="version", version=f"nfm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or NFM_DEBUG=1)")
    options.add_quiet(parser, default=False)
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for group in (teacher, pairs, student, run, report, kt, doctor):
        group.register(stages)
    return parser


def _hint(e: BaseException) -> str:
    """What to do about an error that is not an NFMError."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "the disk is full: free space and rerun the same command (finished work is kept and resumes)"
    if isinstance(e, MemoryError):
        return "out of memory: lower the batch size (train.batch_size, pairs.batch_size) and rerun"
    if isinstance(e, OSError):
        return "a file could not be read or written: check the path and its permissions, then rerun"
    return "this is probably a bug in nfm: rerun with --debug (or NFM_DEBUG=1) and report the traceback"


def launch_warning(env) -> str | None:
    """A launcher that asked for several processes but started one: accelerate's simple launcher
    (`accelerate launch --num_processes N --cpu`) sets MASTER_ADDR for N > 1 yet runs one process without
    WORLD_SIZE; torchrun and `accelerate launch --multi_gpu` set both."""
    if env.get("MASTER_ADDR") and not env.get("WORLD_SIZE"):
        return (
            "a launcher asked for several processes (MASTER_ADDR is set) but this is the only one: "
            "`accelerate launch --num_processes N --cpu` starts one process. For N processes on CPUs use "
            "`torchrun --standalone --nproc_per_node N -m nfm ...` (README: Multi-process)"
        )
    return None


def _close_process_group() -> None:
    """Tear down the process group of a multi-process command before the interpreter exits: left to the
    interpreter's exit, gloo's threads can be destroyed while still joinable, and a rank that finished its
    work aborts ("terminate called without an active exception", SIGABRT)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Every failure is one line on stderr: `nfm: error: <what>`, and for an unexpected exception its type
    and a hint; --debug (or NFM_DEBUG=1) shows the traceback instead."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and isinstance(getattr(args, "overrides", None), list):
        # key=value overrides after an option (`--cache-dir D train.steps=3`): argparse takes one run of
        # positionals only; the later ones are overrides all the same
        late = [u for u in unknown if "=" in u and not u.startswith("-")]
        args.overrides += late
        unknown = [u for u in unknown if u not in late]
    if unknown:  # the command's own usage, not the top level's
        own = getattr(args, "parser", parser)
        flags = [u for u in unknown if u.startswith("--")]
        hint = "; settings are key=value overrides (train.steps=10, not --steps 10): see --help" if flags else ""
        own.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    debug = args.debug or os.environ.get("NFM_DEBUG", "") not in ("", "0")
    if args.quiet:
        from nfm.core.rundir import QUIET_ENV

        os.environ[QUIET_ENV] = "1"
    warning = launch_warning(os.environ)
    if warning:
        print(f"nfm: warning: {warning}", file=sys.stderr)
    from nfm.core.loop import Interrupted

    try:
        return args.func(args)
    except Interrupted as e:
        print(f"nfm: {e}; rerun the same command to resume", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("nfm: interrupted", file=sys.stderr)
        return 130
    except NFMError as e:
        if debug:
            raise
        print(f"nfm: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            raise
        print(f"nfm: error: {e} ({type(e).__name__}); {_hint(e)}", file=sys.stderr)
        return 1
    finally:
        _close_process_group()


if __name__ == "__main__":
    sys.exit(main())
