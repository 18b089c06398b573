"""The pair-cache format: sharded safetensors plus one JSON index, Hugging Face naming.

    CACHE_ROOT/KEY/
      pairs.index.json                   format, key, provenance, sigma_f, shapes, dtypes, shards
      pairs-00001-of-00008.safetensors   noise (n, C, H, W) float16|float32   z / sigma_f
                                         data  (n, C, H, W) uint8 (0..levels) | float32 in [-1, 1]
                                         label (n,) int64;  index (n,) int64 (dataset row);  view (n,) int64

Shard s holds the pairs with ids [s * shard_rows, (s + 1) * shard_rows), pair id = row * views + view,
minus rows dropped as non-finite. A shard appears under its final name only when complete
(written to a temporary name, fsynced, renamed). Shards are read with positional reads of the
rows asked for, never mapped whole, so reading keeps memory flat.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from nfm.pipeline.core.errors import NFMError

FORMAT_VERSION = 1
INDEX_NAME = "pairs.index.json"
SHARD_RE = re.compile(r"^pairs-(\d{5})-of-(\d{5})\.safetensors$")
COLUMNS = ("noise", "data", "label", "index", "view")
_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "U8": np.uint8, "I64": np.int64, "BF16": None}


def shard_name(i: int, n: int) -> str:
    return f"pairs-{i + 1:05d}-of-{n:05d}.safetensors"


def cache_key(fields: dict[str, Any]) -> str:
    """A short hash of everything that determines the pairs (teacher, data, eta, views, seed, dtype...)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def hash_file(path: Path, chunk: int = 1 << 22) -> tuple[str, str]:
    """(sha256, xxh3-128) of a file in one pass. sha256 is the portable checksum (`sha256sum` checks it);
    xxh3-128 (~20 GB/s here against sha256's ~1.7) is what the reader checks on every read."""
    sha, fast = hashlib.sha256(), xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
            fast.update(block)
    return sha.hexdigest(), fast.hexdigest()


def _check_name(cache_dir: Path, name: str) -> None:
    """An index may only name plain shard files inside its cache directory (no paths, no '..')."""
    if not isinstance(name, str) or not SHARD_RE.match(name) or Path(name).name != name:
        raise NFMError(
            f"pair index in {cache_dir} names shard {name!r}, which is not a plain shard file name "
            "(pairs-NNNNN-of-NNNNN.safetensors) inside the cache directory; the index is corrupt or "
            "tampered with: delete the cache (nfm pairs rm) and rebuild it"
        )


def safe_member(cache_dir: Path, name: str) -> Path:
    """The path of a shard the index names: a plain file of the cache directory itself (not a symlink)."""
    _check_name(cache_dir, name)
    path = Path(cache_dir) / name
    if path.is_symlink() or (path.exists() and path.resolve().parent != Path(cache_dir).resolve()):
        raise NFMError(
            f"pair shard {path} is a symbolic link (to {os.path.realpath(path)}); a cache holds its own files "
            "only. Delete the cache (nfm pairs rm) and rebuild it"
        )
    return path


class ShardFile:
    """A safetensors shard read with positional reads: validates the header against the file size."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise NFMError(
                f"pair shard missing: {self.path}. The cache is incomplete: rerun `nfm pairs build` "
                "(it resumes) or `nfm pairs rm` it"
            )
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > min(size - 8, 100 << 20):
                    raise ValueError(f"header length {n} exceeds the file")
                header = json.loads(f.read(n))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise NFMError(f"pair shard {self.path} is truncated or corrupt ({e}); rebuild the cache") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self.base = 8 + n
        self.tensors: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        end = 0
        for name, info in header.items():
            dt = _ST_DTYPES.get(info.get("dtype"))
            if dt is None:
                raise NFMError(f"pair shard {self.path}: tensor {name!r} has unsupported dtype {info.get('dtype')}")
            start, stop = info["data_offsets"]
            self.tensors[name] = (np.dtype(dt), tuple(info["shape"]), start, stop)
            end = max(end, stop)
        if self.base + end != size:
            raise NFMError(
                f"pair shard {self.path} is truncated or corrupt: {size} bytes on disk, its header "
                f"describes {self.base + end}; rebuild the cache (nfm pairs rm, then build)"
            )

    @property
    def rows(self) -> int:
        return self.tensors["label"][1][0]

    def empty(self, name: str) -> torch.Tensor:
        """An uninitialised tensor of `name`'s dtype and shape (a buffer for `read` / `read_verified`)."""
        dt, shape, _, _ = self.tensors[name]
        return torch.from_numpy(np.empty(shape, dtype=dt))

    def read(self, name: str, start: int = 0, stop: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of a tensor, read from disk with one positional read (no mapping of the
        file); into `out` (a contiguous tensor of the right dtype and shape) when given, without a copy."""
        dt, shape, off, _ = self.tensors[name]
        stop = shape[0] if stop is None else stop
        row = int(np.prod(shape[1:], dtype=np.int64)) * dt.itemsize
        if out is None:
            out = torch.from_numpy(np.empty((stop - start, *shape[1:]), dtype=dt))
        buf = memoryview(out.numpy()).cast("B")
        if len(buf) != (stop - start) * row:
            raise ValueError(
                f"out has {len(buf)} bytes, rows [{start}, {stop}) of {name!r} need {(stop - start) * row}"
            )
        with open(self.path, "rb", buffering=0) as f:
            got = os.preadv(f.fileno(), [buf], self.base + off + start * row)
        if got != len(buf):
            raise NFMError(f"pair shard {self.path} is truncated: short read of {name!r}; rebuild the cache")
        return out

    def read_verified(self, entry: dict[str, Any], out: dict[str, torch.Tensor]) -> None:
        """Read the whole file once, in file order, each tensor named in `out` straight into its buffer
        (contiguous, its dtype and shape; the others into scratch), hashing every byte on the way; then check
        the digest against the index entry (xxh3-128; sha256 for caches built before xxh3 was recorded).
        Raises before the caller can use any of it if the file is not what the index says."""
        fast = "xxh3_128" in entry
        h = xxhash.xxh3_128() if fast else hashlib.sha256()
        size = self.path.stat().st_size
        if size != entry.get("bytes"):
            raise NFMError(f"pair shard {self.path} is {size} bytes, the index says {entry.get('bytes')}; rebuild")
        with open(self.path, "rb", buffering=0) as f:
            fd, pos = f.fileno(), 0

            def read_into(buf: memoryview) -> None:
                nonlocal pos
                if os.preadv(fd, [buf], pos) != len(buf):
                    raise NFMError(f"pair shard {self.path} is truncated: short read; rebuild the cache")
                h.update(buf)
                pos += len(buf)

            read_into(memoryview(bytearray(self.base)))
            for name, (_, _, start, stop) in sorted(self.tensors.items(), key=lambda kv: kv[1][2]):
                if self.base + start != pos:  # bytes between tensors (none in files we write): hashed too
                    read_into(memoryview(bytearray(self.base + start - pos)))
                dst = out.get(name)
                if dst is None:
                    read_into(memoryview(bytearray(stop - start)))
                    continue
                buf = memoryview(dst.numpy()).cast("B")
                if len(buf) != stop - start:
                    raise ValueError(f"out[{name!r}] has {len(buf)} bytes, the shard's tensor {stop - start}")
                read_into(buf)
        self._check_digest(h, entry, fast)

    def verify(self, entry: dict[str, Any], chunk: int = 1 << 22) -> None:
        """Hash the file against its index entry without keeping any of it (for readers that map the file)."""
        fast = "xxh3_128" in entry
        h = xxhash.xxh3_128() if fast else hashlib.sha256()
        size = self.path.stat().st_size
        if size != entry.get("bytes"):
            raise NFMError(f"pair shard {self.path} is {size} bytes, the index says {entry.get('bytes')}; rebuild")
        with open(self.path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        self._check_digest(h, entry, fast)

    def _check_digest(self, h: Any, entry: dict[str, Any], fast: bool) -> None:
        if h.hexdigest() != entry.get("xxh3_128" if fast else "sha256"):
            key = self.path.parent.name
            raise NFMError(
                f"pair shard {self.path} does not match its checksum in the index: it changed after the build "
                f"(corrupt or tampered with); nothing of it was used. Check the cache with `nfm pairs verify {key}`, "
                f"then rebuild it (nfm pairs rm {key}, nfm pairs build)"
            )

    def mapped(self) -> dict[str, np.ndarray]:
        """Every tensor as a read-only numpy view of the file mapped into memory: no copy, pages are read
        from the page cache when touched. Check the file first (`verify`) where its content matters."""
        mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return {
            name: mm[self.base + start : self.base + stop].view(dt).reshape(shape)
            for name, (dt, shape, start, stop) in self.tensors.items()
        }


def check_index(cache_dir: Path, index: dict[str, Any], content: bool = False) -> list[str]:
    """Everything the index claims about its shards, checked against the files: names and count
    (num_shards), no symlinks, sizes, per-shard rows against the tensors inside, dtypes and shapes,
    total_rows and dropped pairs against expected_rows; with content=True, sha256 and xxh3-128 too.
    Returns the problems (empty: all good)."""
    cache_dir, problems = Path(cache_dir), []
    shards = index.get("shards", [])
    n = index.get("num_shards")
    names = [s.get("file") for s in shards]
    if index.get("complete") and (len(shards) != n or names != [shard_name(i, n) for i in range(n or 0)]):
        problems.append(f"the index lists {len(shards)} shards for num_shards={n} (or out of order)")
    want = {k: (index["dtypes"][k], tuple(index["shapes"][k])) for k in ("noise", "data")}
    for s in shards:
        try:
            path = safe_member(cache_dir, s.get("file"))
        except NFMError as e:
            problems.append(str(e))
            continue
        if not path.is_file():
            problems.append(f"{s['file']}: missing")
            continue
        size = path.stat().st_size
        if size != s.get("bytes"):
            problems.append(f"{s['file']}: {size} bytes, index says {s.get('bytes')} (truncated or replaced?)")
            continue
        try:
            sf = ShardFile(path)
        except NFMError as e:
            problems.append(str(e))
            continue
        rows = {k: v[1][0] if v[1] else None for k, v in sf.tensors.items()}
        if set(rows) != set(COLUMNS) or len(set(rows.values())) != 1:
            problems.append(f"{s['file']}: columns {rows} are not {COLUMNS} of equal length")
            continue
        if sf.rows != s.get("rows"):
            problems.append(f"{s['file']}: holds {sf.rows} pairs, the index says {s.get('rows')}")
        for k, (dtype, shape) in want.items():
            dt, sh = sf.tensors[k][0], sf.tensors[k][1][1:]
            if dt != np.dtype(dtype) or sh != shape:
                problems.append(f"{s['file']}: {k} is {dt} {sh}, the index says {dtype} {shape}")
        if content:
            sha, fast = hash_file(path)
            if sha != s.get("sha256"):
                problems.append(f"{s['file']}: sha256 mismatch (corrupt)")
            elif "xxh3_128" in s and fast != s["xxh3_128"]:
                problems.append(f"{s['file']}: xxh3-128 mismatch (corrupt)")
    total = sum(s.get("rows", 0) for s in shards)
    if index.get("total_rows") != total:
        problems.append(f"total_rows is {index.get('total_rows')}, the shards' rows add up to {total}")
    dropped = sum(s.get("dropped", 0) for s in shards)
    if index.get("complete") and total + dropped != index.get("expected_rows"):
        problems.append(f"{total} pairs + {dropped} dropped != the {index.get('expected_rows')} expected")
    return problems


def read_index(cache_dir: Path) -> dict[str, Any]:
    path = Path(cache_dir) / INDEX_NAME
    if not path.is_file():
        raise NFMError(f"no pair cache at {cache_dir} (missing {INDEX_NAME}); build one with `nfm pairs build`")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NFMError(f"{path} is corrupt ({e}); delete the cache (nfm pairs rm KEY) and rebuild it") from e
    if index.get("format_version", 0) > FORMAT_VERSION:
        raise NFMError(
            f"pair cache {cache_dir} has format {index.get('format_version')}, newer than this nfm; upgrade nfm"
        )
    for s in index.get("shards", []):
        _check_name(Path(cache_dir), s.get("file"))
    return index
