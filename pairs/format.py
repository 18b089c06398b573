"""The pair-cache format: sharded safetensors plus one JSON index, Hugging Face naming.

    CACHE_ROOT/KEY/
      pairs.index.json                   format, kind, columns, key, provenance, sigma_f, shapes, dtypes, shards
      pairs-00001-of-00008.safetensors   noise (n, C, H, W) float16|float32   z / sigma_f
                                         data  (n, C, H, W) uint8 (0..levels) | float32 in [-1, 1]
                                         label (n,) int64;  index (n,) int64 (dataset row);  view (n,) int64

Every index declares its `kind` and the `columns` its shards hold, with what each means (KIND_COLUMNS): a
teacher's or a reflow cache holds the five above; a logit cache (kt) holds `logits` (n, classes) float32 where
the others hold `noise`, and records no sigma_f. Caches written before the declaration keep their keys and keep
reading: their kind follows from their key fields, and a logit cache of then keeps its logits under `noise`.

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

from nfm.core.errors import NFMError

FORMAT_VERSION = 1
INDEX_NAME = "pairs.index.json"
ORIGIN_NAME = "origin.json"  # a cache that came from elsewhere (a pull): where from, and whether it was checked
SHARD_RE = re.compile(r"^pairs-(\d{5})-of-(\d{5})\.safetensors$")
KEY_RE = re.compile(r"^[0-9a-f]{20}$")
_ROWS = {
    "label": "the class (int64; 0 for unlabelled data)",
    "index": "the training image's row in its data set (int64)",
    "view": "the draw of this row: 0 .. views - 1 (int64)",
}
# The kinds of cache and the columns of each, as the index declares them (`kind`, `columns`):
KIND_COLUMNS: dict[str, dict[str, str]] = {
    "teacher": {  # (noise, data) pairs of a normalizing-flow teacher
        "noise": "z = encode(x + eta * eps) / sigma_f (the teacher's latent, in units of sigma_f)",
        "data": "x: the training image (grey levels 0..levels as uint8, else float32 in [-1, 1])",
        **_ROWS,
    },
    "reflow": {  # (noise, data) pairs of a trained student
        "noise": "z ~ N(0, I): the student's starting noise",
        "data": "x = ODE(z): the student's sample (float32)",
        **_ROWS,
    },
    "kt": {  # a classifier's logits per image view (FM-KT)
        "logits": "the classifier's logits of the view (float32, one per class)",
        "data": "the view: the training image shifted and flipped as augment drew it (grey levels, uint8)",
        "label": _ROWS["label"],
        "index": _ROWS["index"],
        "view": "0: the image itself; v >= 1: an augmented view (int64)",
    },
}
KINDS = tuple(KIND_COLUMNS)
FLOW_KINDS = ("teacher", "reflow")  # what a flow-matching student trains on
COLUMNS = tuple(KIND_COLUMNS["teacher"])  # the columns of a flow cache; a logit cache of before the declaration too
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


def cache_kind(index: dict[str, Any]) -> str:
    """What a cache holds (KINDS). The key fields name it (`kind`: reflow, kt; none: teacher pairs), so it is as
    certain as the key; the index's declared `kind` (absent before the declaration) must say the same."""
    fields = index.get("key_fields")
    fields = fields if isinstance(fields, dict) else {}
    implied, declared = fields.get("kind", "teacher"), index.get("kind")
    if implied not in KINDS or declared not in (None, implied):
        return f"unknown ({declared or implied!r})"
    return implied


def columns_of(index: dict[str, Any]) -> tuple[str, ...]:
    """The columns a cache's shards hold: as its index declares them; a cache written before the declaration
    holds the five of a flow cache (a logit cache of then: its logits under `noise`)."""
    declared = index.get("columns")
    return tuple(declared) if isinstance(declared, dict) and declared else COLUMNS


def logits_column(index: dict[str, Any]) -> str:
    """Where a logit cache keeps its logits: `logits`, or `noise` in a cache written before the declaration."""
    return "logits" if "logits" in columns_of(index) else "noise"


_KIND_WORDS = {
    "teacher": "noise/data pairs of a teacher",
    "reflow": "reflow pairs of a student",
    "kt": "a classifier's logits (an FM-KT cache)",
}


def require_kind(cache_dir: Path, index: dict[str, Any], kinds: tuple[str, ...], reader: str) -> str:
    """The cache's kind, if `reader` accepts it; else one line naming what the cache holds and what reads it."""
    kind = cache_kind(index)
    if kind in kinds:
        return kind
    fix = {
        "kt": f"train a KT student on it: nfm kt student train --pairs {Path(cache_dir).name[:8]}",
        "teacher": "a logit cache comes from `nfm kt pairs build`",
        "reflow": "a logit cache comes from `nfm kt pairs build`",
    }.get(kind, "it was written by another version of nfm, or tampered with")
    wants = " or ".join(_KIND_WORDS[k] for k in kinds)
    raise NFMError(
        f"pair cache {Path(cache_dir).name} holds {_KIND_WORDS.get(kind, kind)}; {reader} reads {wants}: {fix}"
    )


def check_key(cache_dir: Path, index: dict[str, Any]) -> str:
    """The index's key, proven: a key's 20 hex characters are the hash of the index's own key fields (what
    determined the pairs), so a cache cannot claim another cache's key without claiming its inputs too; and a
    directory named by a key holds that key's index."""
    key, fields = index.get("key"), index.get("key_fields")
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise NFMError(f"{Path(cache_dir) / INDEX_NAME} names key {key!r}, not a pair-cache key (20 hex characters)")
    if not isinstance(fields, dict) or cache_key(fields) != key:
        got = cache_key(fields) if isinstance(fields, dict) else "no key fields"
        raise NFMError(
            f"pair cache {Path(cache_dir).name} names key {key}, but its key fields hash to {got}: the index was "
            "edited after the build (or forged); nothing of it is used. Remove it (nfm pairs rm) and rebuild or pull it"
        )
    name = Path(cache_dir).name
    if KEY_RE.match(name) and name != key:
        raise NFMError(
            f"pair cache {name} holds an index for key {key}: it was moved or copied under another key, and nothing "
            f"of it is used. Rename the directory to {key}, or delete it yourself (nfm pairs rm removes only "
            "directories named by their own key)"
        )
    # what the readers take from the index rather than the key fields must say the same
    same = [("views", index.get("views")), ("seed", index.get("seed")), ("eta", index.get("noise_std")),
            ("dtype", (index.get("dtypes") or {}).get("noise"))]  # fmt: skip
    for name, value in same:
        if name in fields and fields[name] != value:
            raise NFMError(
                f"pair cache {Path(cache_dir).name}: its index says {name} {value!r}, its key fields "
                f"{fields[name]!r}: the index was edited after the build. Remove it (nfm pairs rm) and rebuild it"
            )
    return key


def read_origin(cache_dir: Path) -> dict[str, Any] | None:
    """Where a cache came from, if not from a build here: {"source": ..., "verified": None | {...}}."""
    path = Path(cache_dir) / ORIGIN_NAME
    if not path.is_file():
        return None
    try:
        origin = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        origin = None
    if not isinstance(origin, dict):  # unreadable: still foreign, never checked
        return {"source": f"unknown (unreadable {ORIGIN_NAME})", "verified": None}
    return origin


def is_foreign(cache_dir: Path) -> bool:
    """A cache pulled from elsewhere and not yet checked against the user's own teacher (or student)."""
    origin = read_origin(cache_dir)
    return origin is not None and not origin.get("verified")


def is_build_leftover(name: str) -> bool:
    """A temp file a killed build leaves in a cache directory (ours: .NAME.XXXX.tmp; Python's tempfile: .tmpXXXX)."""
    return name.startswith(".") and (name.endswith(".tmp") or name.startswith(".tmp"))


def _name_problem(name: Any) -> str | None:
    if not isinstance(name, str) or not SHARD_RE.match(name) or Path(name).name != name:
        return (
            f"the index names shard {name!r}, which is not a plain shard file name "
            "(pairs-NNNNN-of-NNNNN.safetensors) inside the cache directory (corrupt or tampered with)"
        )
    return None


def member_problem(cache_dir: Path, name: Any) -> str | None:
    """Why `name` is not a shard the cache may read (None: it may): a plain file name of the cache directory
    itself, not a path, not a symlink."""
    problem = _name_problem(name)
    if problem:
        return problem
    path = Path(cache_dir) / name
    if path.is_symlink() or (path.exists() and path.resolve().parent != Path(cache_dir).resolve()):
        return f"shard {name} is a symbolic link (to {os.path.realpath(path)}); a cache holds its own files only"
    return None


def safe_member(cache_dir: Path, name: str) -> Path:
    """The path of a shard the index names: a plain file of the cache directory itself (not a symlink)."""
    problem = member_problem(cache_dir, name)
    if problem:
        raise NFMError(f"pair cache {Path(cache_dir).name}: {problem}. Delete it (nfm pairs rm) and rebuild it")
    return Path(cache_dir) / name


def cache_files(cache_dir: Path, index: dict[str, Any]) -> list[Path]:
    """The files a cache consists of: its index and the shards it names (nothing else of the directory)."""
    return [Path(cache_dir) / INDEX_NAME] + [safe_member(Path(cache_dir), s["file"]) for s in index["shards"]]


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
    columns = columns_of(index)
    want = {k: (index["dtypes"][k], tuple(index["shapes"][k])) for k in columns[:2]}  # the pair's two ends
    for s in shards:
        problem = member_problem(cache_dir, s.get("file"))
        if problem:
            problems.append(problem)
            continue
        path = cache_dir / s["file"]
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
        if set(rows) != set(columns) or len(set(rows.values())) != 1:
            problems.append(f"{s['file']}: columns {rows} are not {columns} of equal length")
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
    if not isinstance(index, dict) or not isinstance(index.get("shards", []), list):
        raise NFMError(f"{path} is not a pair index; delete the cache (nfm pairs rm KEY) and rebuild it")
    if index.get("format_version", 0) > FORMAT_VERSION:
        raise NFMError(
            f"pair cache {cache_dir} has format {index.get('format_version')}, newer than this nfm; upgrade nfm"
        )
    for s in index.get("shards", []):
        problem = _name_problem(s.get("file") if isinstance(s, dict) else s)
        if problem:
            raise NFMError(f"pair cache {Path(cache_dir).name}: {problem}. Delete it (nfm pairs rm) and rebuild it")
    return index
