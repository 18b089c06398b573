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

from nfm.pipeline.core.errors import NFMError

FORMAT_VERSION = 1
INDEX_NAME = "pairs.index.json"
SHARD_RE = re.compile(r"^pairs-(\d{5})-of-(\d{5})\.safetensors$")
_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "U8": np.uint8, "I64": np.int64, "BF16": None}


def shard_name(i: int, n: int) -> str:
    return f"pairs-{i + 1:05d}-of-{n:05d}.safetensors"


def cache_key(fields: dict[str, Any]) -> str:
    """A short hash of everything that determines the pairs (teacher, data, eta, views, seed, dtype...)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def safe_member(cache_dir: Path, name: str) -> Path:
    """An index may only name plain files inside its cache directory (no paths, no '..')."""
    if not isinstance(name, str) or not SHARD_RE.match(name) or Path(name).name != name:
        raise NFMError(
            f"pair index in {cache_dir} names shard {name!r}, which is not a plain shard file name "
            "(pairs-NNNNN-of-NNNNN.safetensors) inside the cache directory; the index is corrupt or "
            "tampered with: delete the cache (nfm pairs rm) and rebuild it"
        )
    return cache_dir / name


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
        safe_member(Path(cache_dir), s.get("file"))
    return index
