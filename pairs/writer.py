"""The pair-cache writer every builder shares (teacher pairs, reflow pairs, logit caches).

A builder says what the cache is (a `CachePlan`: key fields, pair count, shard size) and how to make it (a
`ShardSource`: the index header and the columns of shard s); `write_cache` does the rest, the same for every
kind of cache:

    under the key's lock (CACHE_ROOT/.KEY.lock, held by the main process): a complete cache is a hit (checked
    against its files; a pulled one only once the builder's own model has checked it), else the shards this
    process owns (s % processes == rank) that are not there yet are encoded and written atomically, the index
    after each one, and at the end the index over all of them is marked complete.

The source is asked for nothing on a hit: `header()` may be expensive (the teacher's sigma_f pass).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from filelock import FileLock, Timeout

from nfm.core.data import ImageDataset
from nfm.core.errors import NFMError
from nfm.core.io import check_free_space, save_tensors, write_json
from nfm.core.rundir import progress
from nfm.pairs.format import (
    FORMAT_VERSION,
    INDEX_NAME,
    KIND_COLUMNS,
    ShardFile,
    cache_key,
    check_index,
    check_key,
    hash_file,
    is_build_leftover,
    is_foreign,
    read_index,
    read_origin,
    shard_name,
)
from nfm.pairs.lookup import default_cache_root


@dataclass(frozen=True)
class PairBuildResult:
    """What a build did: reused a complete cache (hit) or built / finished it."""

    key: str
    path: Path  # CACHE_ROOT/KEY
    hit: bool  # True: the complete cache was there already; nothing was encoded
    total_rows: int  # pairs in the cache
    dropped: int  # pairs dropped as non-finite (over all shards)
    built_rows: int  # pairs this process encoded in this call


@dataclass(frozen=True)
class WriteLimits:
    """What a build may write: the share of non-finite pairs it may drop, and whether to check the disk first."""

    max_nonfinite: float = 0.0
    check_space: bool = True


@dataclass
class CachePlan:
    """Everything that determines the cache: its key, layout and size."""

    key: str
    fields: dict[str, Any]
    cache_dir: Path
    total: int  # pairs expected: rows x views
    shard_rows: int
    num_shards: int
    row_bytes: int  # bytes per pair on disk (the disk-space check)

    @classmethod
    def make(
        cls, fields: dict[str, Any], total: int, shard_rows: int, cache_root: Path | None, row_bytes: int
    ) -> CachePlan:
        """The plan of the cache whose key is the hash of `fields`, holding `total` pairs."""
        key = cache_key(fields)
        return cls(
            key=key,
            fields=fields,
            cache_dir=Path(cache_root or default_cache_root()) / key,
            total=total,
            shard_rows=shard_rows,
            num_shards=max(1, math.ceil(total / shard_rows)),
            row_bytes=row_bytes,
        )

    def check_space(self) -> None:
        """The disk under the cache root holds what is left to write (shards already there count)."""
        shards = self.cache_dir.glob("pairs-*.safetensors") if self.cache_dir.is_dir() else []
        have = sum(f.stat().st_size for f in shards)
        check_free_space(
            self.cache_dir,
            self.total * self.row_bytes - have,
            f"pair cache {self.key} ({self.total} pairs)",
            "free space there, or build under another cache root (--cache-dir, or NFM_CACHE_DIR)",
        )

    def shard_ids(self, s: int) -> torch.Tensor:
        return torch.arange(s * self.shard_rows, min((s + 1) * self.shard_rows, self.total))

    def header(
        self, kind: str, kind_fields: dict[str, Any], shapes: dict[str, list[int]], dtypes: dict[str, str]
    ) -> dict:
        """The index header every kind of cache has (format, kind, columns, key, layout), around the kind's own
        fields."""
        return {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "columns": KIND_COLUMNS[kind],
            "key": self.key,
            "key_fields": self.fields,
            **kind_fields,
            "dtypes": {**dtypes, "label": "int64", "index": "int64"},
            "shapes": shapes,
            "shard_rows": self.shard_rows,
            "num_shards": self.num_shards,
            "expected_rows": self.total,
        }


def data_header(data: ImageDataset, split: str) -> dict[str, Any]:
    """The index's description of the data set a cache was built from."""
    return {
        "name": data.name,
        **({"config": asdict(data.data_config)} if getattr(data, "data_config", None) is not None else {}),
        "split": split,
        "fingerprint": data.fingerprint,
        "rows": len(data),
        "levels": data.levels,
        "num_classes": data.num_classes,
        **({"class_names": list(data.class_names)} if data.class_names else {}),
    }


class ShardSource(Protocol):
    """A builder's side of `write_cache`, asked only when the cache must be (re)built."""

    def header(self) -> dict[str, Any]:
        """The index header (CachePlan.header + what the kind records). Called once, first."""
        ...

    def encode(self, s: int, bar) -> dict[str, torch.Tensor]:
        """Shard s's columns (its kind's KIND_COLUMNS; non-finite rows included), `bar` updated per row."""
        ...


Vet = Callable[[Path], dict[str, Any]]  # check a complete cache against the model the build has; raise if it fails


def shard_rows_for(row_bytes: int, shard_rows: int, shard_mb: int) -> int:
    """Pairs per shard: `shard_rows` if set, else as many as fit in `shard_mb`."""
    return shard_rows if shard_rows > 0 else max(1, (shard_mb << 20) // row_bytes)


def write_cache(
    plan: CachePlan,
    source: ShardSource,
    limits: WriteLimits,
    state,
    log=print,
    verify: bool = False,
    vet: Vet | None = None,
) -> PairBuildResult:
    """Build (or resume, or reuse) the cache of `plan` from `source`. A reused cache is checked against its
    files (verify=True: their content too); a pulled one is used only after `vet` passed on it."""
    plan.cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(plan, state.is_main_process, log):
        state.wait_for_everyone()  # every process starts once the main one holds the key's lock
        return _write_locked(plan, source, limits, state, verify, log, vet)


def assemble_index(cache_dir: Path, base: dict[str, Any], num_shards: int, complete: bool) -> dict[str, Any]:
    """Index over the shards present under their final names (sha256 reused where already known)."""
    known = {}
    if (cache_dir / INDEX_NAME).is_file():
        try:
            known = {s["file"]: s for s in read_index(cache_dir).get("shards", [])}
        except NFMError:
            known = {}
    shards = []
    for i in range(num_shards):
        name = shard_name(i, num_shards)
        path = cache_dir / name
        if not path.is_file():
            continue
        size = path.stat().st_size
        entry = known.get(name)
        if entry is None or entry.get("bytes") != size or "xxh3_128" not in entry:
            sf = ShardFile(path)
            sha, fast = hash_file(path)
            entry = {
                "file": name,
                "rows": sf.rows,
                "bytes": size,
                "sha256": sha,
                "xxh3_128": fast,
                "dropped": int(json.loads(sf.metadata.get("nfm-pairs", "{}")).get("dropped", 0)),
            }
        shards.append(entry)
    index = {
        **base,
        "complete": complete and len(shards) == num_shards,
        "shards": shards,
        "total_rows": sum(s["rows"] for s in shards),
        "dropped": sum(s.get("dropped", 0) for s in shards),
    }
    write_json(cache_dir / INDEX_NAME, index)
    return index


def complete_index(cache_dir: Path, content: bool = False) -> dict[str, Any] | None:
    """The index of a complete cache, checked against its shard files (everything the index claims; the
    content too with content=True); None if there is no complete cache. A complete cache that disagrees
    with its files is refused: it was damaged or tampered with after its build."""
    if not (cache_dir / INDEX_NAME).is_file():
        return None
    index = read_index(cache_dir)
    if not index.get("complete"):
        return None
    check_key(cache_dir, index)  # named by its key, which its key fields hash to
    problems = check_index(cache_dir, index, content=content)
    if problems:
        raise NFMError(
            f"pair cache {cache_dir.name} does not match its index: {'; '.join(problems[:4])}"
            + (f" (+{len(problems) - 4} more)" if len(problems) > 4 else "")
            + f". Rebuild it: nfm pairs rm {cache_dir.name}, then nfm pairs build"
        )
    return index


def _too_many_nonfinite(dropped: int, limits: WriteLimits, total: int, rows: list[int]) -> NFMError:
    allowed = int(limits.max_nonfinite * total)
    example = f"; e.g. dataset rows {rows[:5]}" if rows else ""
    return NFMError(
        f"{dropped} pairs encode to NaN/Inf (allowed: {allowed} = pairs.max_nonfinite "
        f"{limits.max_nonfinite} x {total}){example}. "
        "The teacher is unstable on this data (check it with `nfm teacher eval`), or raise "
        "max_nonfinite to drop such pairs. Nothing past the last complete shard was written"
    )


def _write_shard(shard: dict[str, torch.Tensor], plan: CachePlan, s: int, sigma: float | None, dropped: int) -> None:
    # one metadata entry: safetensors does not keep the order of several, and shards must be byte-exact
    provenance = {
        "key": plan.key,
        "shard": s + 1,
        "of": plan.num_shards,
        **({"teacher": plan.fields["teacher"]} if "teacher" in plan.fields else {"student": plan.fields["student"]}),
        "data": plan.fields["data"],
        "dropped": dropped,
        **({"sigma_f": sigma} if sigma is not None else {}),  # a flow cache's noise unit
    }
    meta = {"nfm-pairs": json.dumps(provenance, sort_keys=True)}
    save_tensors(plan.cache_dir / shard_name(s, plan.num_shards), shard, metadata=meta)


def _vet_foreign(plan: CachePlan, vet: Vet | None, log) -> None:
    """A pulled cache under the build's key is used only after the build's own model has checked it: its bytes
    match its index, but the index could have been written by anyone."""
    from nfm.pairs.verify import mark_verified, require_intact

    source = (read_origin(plan.cache_dir) or {}).get("source", "elsewhere")
    if vet is None:
        raise NFMError(
            f"pair cache {plan.key} came from {source} and has not been checked against the model that should "
            f"have made it: check it (nfm pairs verify {plan.key} --teacher SPEC) or remove it (nfm pairs rm "
            f"{plan.key}), then build again"
        )
    log(f"pair cache {plan.key} came from {source}: checking it against this build's model before using it")
    require_intact(plan.cache_dir)
    how = vet(plan.cache_dir)
    mark_verified(plan.cache_dir, how)
    summary = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in how.items())
    log(f"pair cache {plan.key}: checked ({summary}); using it")


@contextmanager
def _build_lock(plan: CachePlan, main: bool, log):
    """One build of a key at a time: CACHE_ROOT/.KEY.lock, held by the main process for the whole build. A
    second build of the same key waits, then finds the cache complete (a hit)."""
    if not main:
        yield
        return
    lock = FileLock(str(plan.cache_dir.parent / f".{plan.key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"another process is building pair cache {plan.key}; waiting for it")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _remove_leftovers(cache_dir: Path) -> None:
    """Temp files of a build that was killed (format.is_build_leftover). Called only under the key's lock, so no
    running build owns them."""
    for stale in cache_dir.iterdir():
        if is_build_leftover(stale.name) and (stale.is_file() or stale.is_symlink()):
            stale.unlink(missing_ok=True)


def _write_locked(
    plan: CachePlan, source: ShardSource, limits: WriteLimits, state, verify: bool, log, vet: Vet | None
) -> PairBuildResult:
    rank, world = state.process_index, state.num_processes
    index = complete_index(plan.cache_dir, content=verify)
    if index is not None and is_foreign(plan.cache_dir):
        if state.is_main_process:
            _vet_foreign(plan, vet, log)
        state.wait_for_everyone()
        if is_foreign(plan.cache_dir):  # the main process refused it
            raise NFMError(f"pair cache {plan.key} was not checked; see the main process's message")
    if index is not None:
        checked = ", content verified" if verify else ""
        log(f"pair cache hit: {plan.key} ({index['total_rows']} pairs{checked}) at {plan.cache_dir}")
        return PairBuildResult(plan.key, plan.cache_dir, True, index["total_rows"], index.get("dropped", 0), 0)
    if state.is_main_process and limits.check_space:
        plan.check_space()
    base = source.header()
    sigma, first = base.get("sigma_f"), next(iter(base["columns"]))  # first: noise, or a logit cache's logits
    if state.is_main_process:
        plan.cache_dir.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(plan.cache_dir)
        assemble_index(plan.cache_dir, base, plan.num_shards, complete=False)
    state.wait_for_everyone()

    present = lambda s: (plan.cache_dir / shard_name(s, plan.num_shards)).is_file()  # noqa: E731
    mine = [s for s in range(plan.num_shards) if s % world == rank and not present(s)]
    allowed = int(limits.max_nonfinite * plan.total)
    dropped_total = sum(s.get("dropped", 0) for s in read_index(plan.cache_dir).get("shards", []))
    bar = progress(sum(len(plan.shard_ids(s)) for s in mine), f"pairs {plan.key[:8]}", "pair",
                   main=state.is_main_process)  # fmt: skip
    t0 = time.perf_counter()
    for s in mine:
        shard = source.encode(s, bar)
        finite = torch.isfinite(shard[first]).flatten(1).all(1)
        finite &= torch.isfinite(shard["data"].float()).flatten(1).all(1)
        dropped = int((~finite).sum())
        dropped_total += dropped  # this process's view: the shards present at start + its own
        if dropped_total > allowed:
            raise _too_many_nonfinite(dropped_total, limits, plan.total, shard["index"][~finite].tolist())
        if dropped:
            log(f"shard {s + 1}: dropped {dropped} non-finite pairs")
            shard = {k: v[finite] for k, v in shard.items()}
        _write_shard(shard, plan, s, sigma, dropped)
        if state.is_main_process and world == 1:
            assemble_index(plan.cache_dir, base, plan.num_shards, complete=False)
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        _finish(plan, base, limits, bar.n / max(time.perf_counter() - t0, 1e-9) if mine else None, log)
    state.wait_for_everyone()
    index = read_index(plan.cache_dir)
    if not index.get("complete"):  # another process refused the cache (too many non-finite pairs)
        raise _too_many_nonfinite(index.get("dropped", 0), limits, plan.total, [])
    return PairBuildResult(plan.key, plan.cache_dir, False, index["total_rows"], index.get("dropped", 0), bar.n)


def _finish(plan: CachePlan, base: dict[str, Any], limits: WriteLimits, rate: float | None, log) -> None:
    """Main process, after every process has written its shards: the index over all of them, marked
    complete only if every shard is there and the non-finite pairs of all processes together are allowed."""
    index = assemble_index(plan.cache_dir, base, plan.num_shards, complete=False)
    if len(index["shards"]) != plan.num_shards:
        raise NFMError(f"pair cache {plan.cache_dir} is missing shards after the build; rerun it")
    if index["dropped"] > int(limits.max_nonfinite * plan.total):
        return  # left incomplete: every process raises after the barrier
    index = assemble_index(plan.cache_dir, base, plan.num_shards, complete=True)
    speed = f", {rate:.0f} pairs/s" if rate else ""
    log(
        f"pair cache built: {plan.key} ({index['total_rows']} pairs, {index['dropped']} dropped{speed}) "
        f"at {plan.cache_dir}"
    )
