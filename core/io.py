"""Atomic file I/O: nothing half-written is ever visible under its final name.

Every file is written to a temporary name in the same directory, flushed, fsynced and
renamed into place (`os.replace` is atomic on POSIX). Directories (checkpoints, exports)
are assembled under a temporary name and renamed when complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nfm.core.errors import NFMError

_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_free_space(path: str | Path, need: int, what: str, fix: str) -> None:
    """Refuse, in one line, work that will write about `need` bytes under `path` (or the nearest existing
    folder above it) when the disk there has less free (plus 5 % and 64 MB of margin)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    free = shutil.disk_usage(p).free
    if need > 0 and free < need * 1.05 + (64 << 20):
        raise NFMError(f"{what} needs about {_size(need)} at {path}, and the disk there has {_size(free)} free: {fix}")


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, then rename tmp_path to `path`. The temp file is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def write_json(path: str | Path, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda p: p.write_text(text))


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise NFMError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NFMError(f"{what} {path} is not valid JSON ({e}); it is corrupt: delete or regenerate it") from e


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Atomically write a safetensors file (tensors made contiguous and detached)."""
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def write(p: Path) -> None:
        try:
            save_file(flat, str(p), metadata=metadata)
        except SafetensorError as e:  # an I/O failure inside safetensors: raise it as the OSError it is
            code = errno.ENOSPC if "os error 28" in str(e) or "No space left" in str(e) else errno.EIO
            raise OSError(code, f"{os.strerror(code)} while writing {path}") from e

    return atomic_write(path, write)


def load_tensors(path: str | Path, what: str = "weights file", device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file with a clear error for a missing, truncated or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise NFMError(f"{what} not found: {path}")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise NFMError(f"{what} {path} cannot be read ({e}); it is truncated or corrupt: regenerate it") from e


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name; on success it replaces `path` in one rename.

    If `path` already exists it is moved aside first and removed after the rename, so at
    every instant either the old or the new complete directory is visible under `path`
    (or, for a moment, none, never a partial one).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


EXPORT_VERSION = 1  # config.json's format_version: an export of a newer version is refused, not misread


def write_export(
    directory: str | Path, state: dict[str, torch.Tensor], kind: str, config: dict[str, Any],
    metadata: dict[str, str] | None = None,
) -> Path:  # fmt: skip
    """The one export format (teacher, student, classifier, KT student): model.safetensors (its metadata's
    format: nfm-KIND) + config.json ({"kind": KIND, "format_version": EXPORT_VERSION, **config})."""
    directory = Path(directory)
    save_tensors(directory / "model.safetensors", state, metadata={"format": f"nfm-{kind}", **(metadata or {})})
    write_json(directory / "config.json", {"kind": kind, "format_version": EXPORT_VERSION, **config})
    return directory


def export_dir(path: str | Path, what: str, train: str) -> Path:
    """A run directory, its export/ or the export's config.json -> the export directory; one line where there is
    none (a run that has not finished: rerun `train` to resume it)."""
    p = Path(path).expanduser()
    if p.is_file() and p.name == "config.json":
        p = p.parent
    if (p / "export" / "config.json").is_file():
        return p / "export"
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return p
    if not p.exists():
        raise NFMError(f"{what} not found: {p} does not exist")
    students, teachers = sorted(p.glob("students/*/export/config.json")), sorted(p.glob("teacher-*/export/config.json"))
    inside = teachers + students if what == "teacher" else students + teachers
    if inside:  # an `nfm run` folder: several exports, each its own
        names = ", ".join(str(e.parent.relative_to(p)) for e in inside)
        raise NFMError(
            f"{p} is an `nfm run` folder holding several exports, not one {what}: pass one of them, e.g. {p}/"
            f"{inside[0].parent.relative_to(p)} (its report.json names each model's, under `exports`); here: {names}"
        )
    if (p / "checkpoints").is_dir():
        raise NFMError(f"{p} is a {what} run that has not finished (no export yet): rerun its `{train}` to resume it")
    raise NFMError(
        f"{p} is neither a {what} run directory nor a {what} export (expected config.json + model.safetensors)"
    )


def read_export_config(path: str | Path, kind: str, what: str, train: str) -> tuple[Path, dict[str, Any]]:
    """(export directory, its config.json) of an export of `kind`; another kind, or a newer format, is refused in
    one line."""
    d = export_dir(path, what, train)
    meta = read_json(d / "config.json", f"{what} config")
    if meta.get("kind") != kind:
        got = meta.get("kind") or meta.get("format") or "nothing nfm wrote"
        raise NFMError(f"{d} holds a {got} export, not a {what} export; train one with `{train}`")
    if meta.get("format_version", 0) > EXPORT_VERSION:
        raise NFMError(f"{d} was written by a newer nfm (format {meta['format_version']}); upgrade nfm")
    return d, meta


def read_export(
    path: str | Path, kind: str, what: str, train: str
) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]]:
    """(export directory, its config.json, its weights) of an export of `kind` (read_export_config)."""
    d, meta = read_export_config(path, kind, what, train)
    return d, meta, load_tensors(d / "model.safetensors", f"{what} weights")


def load_torch_weights(path: str | Path, what: str) -> Any:
    """torch.load(path, weights_only=True): tensors and plain containers, never arbitrary pickled objects. A
    refusal is one line: what the file holds that is not weights, and how to save weights instead."""
    import pickle
    import re

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise NFMError(f"{what} not found: {path}") from e
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global:\s*GLOBAL\s+([\w.]+)", str(e))
        if not found:  # not a refused object: a damaged or foreign file
            raise NFMError(
                f"{what} {path} cannot be read with torch.load(weights_only=True): it is corrupt or not a torch file"
            ) from None
        names = f" ({found.group(1)})"  # weights_only refused a global: the file holds pickled Python objects
        raise NFMError(
            f"{what} {path} holds pickled Python objects{names}, not only tensors, and nfm reads weights with "
            "torch.load(weights_only=True) only: save the weights alone (torch.save(model.state_dict(), path))"
        ) from None
    except Exception as e:  # truncated, corrupt, not a torch file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NFMError(
            f"{what} {path} cannot be read with torch.load(weights_only=True) ({first}): it is corrupt or not a "
            "torch file"
        ) from None


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()


def save_state(path: str | Path, state: dict[str, torch.Tensor], fmt: str) -> None:
    """Save the saved state of interrupted work (a fit's partial sums, iterates) with its own checksum in the
    file's metadata, so the file and its checksum are written in one atomic rename."""
    save_tensors(path, state, metadata={"format": fmt, "sha256": tensors_digest(state)})


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state saved by `save_state`, whole or not at all: NFMError (the reason, naming the file) when the file is
    unreadable or does not match its checksum. The caller checks names, shapes and values."""
    from safetensors import safe_open

    name = Path(path).name
    try:
        with safe_open(str(path), "pt") as f:
            digest = (f.metadata() or {}).get("sha256")
    except Exception as e:  # a header damaged beyond parsing
        raise NFMError(f"its saved state {name} is unreadable ({type(e).__name__})") from e
    state = load_tensors(path, "saved state")
    if digest is None or tensors_digest(state) != digest:
        raise NFMError(f"its saved state {name} does not match its checksum (corrupt)")
    return state
