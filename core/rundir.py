"""A run directory: RUN/config.json, RUN/log.txt, RUN/metrics.jsonl (checkpoints: see checkpoint.py)."""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from nfm.core import config as config_mod
from nfm.core.errors import NFMError
from nfm.core.io import read_json, write_bytes, write_json

# Keys that may change between a run and its resumption.
RESUMABLE_CHANGES = {
    "train.steps",
    "train.log_every",
    "train.sample_every",
    "train.ckpt_every",
    "train.keep_ckpts",
    "train.num_workers",
    "train.log_with",
    "train.compile",
    "sample.prior",  # the prior a student is sampled from: previews and its export, not its weights
}


QUIET_ENV = "NFM_QUIET"  # set by `nfm --quiet`; inherited by the processes torchrun starts


def quiet() -> bool:
    """`nfm --quiet` (or NFM_QUIET=1): no progress bars, and only warnings and errors on stdout (RUN/log.txt
    still gets every line)."""
    return os.environ.get(QUIET_ENV, "") not in ("", "0")


def progress(total: int | None, desc: str, unit: str = "it", initial: int = 0, main: bool = True):
    """The one progress bar of every stage: tqdm on stderr, live on a terminal, a line every 30 s in a log
    file, none on the other processes of a multi-process run or with --quiet."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=quiet() or not main,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
    )


class _TqdmHandler(logging.Handler):
    """Writes through tqdm, so progress bars stay intact."""

    def emit(self, record):
        tqdm.write(self.format(record), file=sys.stdout)


def setup_logger(run_dir: Path | None, name: str = "nfm", main: bool = True) -> logging.Logger:
    """Log to stdout (through tqdm) and to RUN/log.txt. Calling it again for the same run replaces (and
    closes) the handlers of the previous call."""
    log = logging.getLogger(f"{name}.{run_dir}")
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    log.propagate = False
    log.setLevel(logging.INFO if main else logging.WARNING)
    h = _TqdmHandler()
    h.setLevel(logging.WARNING if quiet() else logging.NOTSET)
    h.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(h)
    if run_dir is not None and main:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "log.txt")
        fh.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(fh)
    return log


def log_config(log: logging.Logger, table: str, echo: bool = True) -> None:
    """A stage's resolved config table: on stdout and in RUN/log.txt, or (echo=False, a stage of `nfm run`, which
    printed the whole config once) in RUN/log.txt only."""
    if echo:
        log.info(table)
        return
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, table, None, None)
    for h in log.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


@contextmanager
def run_dir_lock(run_dir: Path, main: bool = True):
    """One training per run directory: RUN/.lock, held for the whole run by the main process. A second
    command pointed at the same directory stops at once with one line instead of writing beside it."""
    if not main:
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise NFMError(
            f"run directory {run_dir} is in use by another nfm process; wait for it to finish (rerunning the "
            "same command afterwards resumes), or choose another --run-dir"
        ) from None
    try:
        yield
    finally:
        lock.release()


def run_identity(resolved: dict[str, Any]) -> str:
    """A run's identity: a hash of its resolved config less the settings a resumed run may change
    (RESUMABLE_CHANGES). Its checkpoints carry it, and a run resumes only from its own."""
    import hashlib

    flat = {k: v for k, v, _ in config_mod.diff(resolved, {}) if k not in RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_run_dir(run_dir: Path, resolved: dict[str, Any]) -> None:
    """Write RUN/config.json; refuse to resume a run dir whose config differs in a way that matters."""
    path = run_dir / "config.json"
    if path.exists():
        old = read_json(path, "run config")
        changed = [d for d in config_mod.diff(old, resolved) if d[0] not in RESUMABLE_CHANGES]
        if changed:
            lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed[:6])
            raise NFMError(
                f"run directory {run_dir} holds a run with a different config ({lines}). "
                "Resume it with its own config, or start a new run with another --run-dir"
            )
    write_json(path, resolved)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past `step` (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
    write_bytes(path, "".join(k + "\n" for k in keep).encode())


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
