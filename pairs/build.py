"""Stage two: one pass of the frozen teacher over the data, data -> noise, into a pair cache.

For dataset row r and view v (pair id p = r * views + v):

    eps_{r,v} ~ N(0, I)    drawn from a generator seeded by (seed, r, v), not by a process's stream
    z_{r,v}   = encode(x_r + eta * eps_{r,v}, y_r)                 any teacher.protocol.Teacher
                eta = eta_scale * the teacher's eta (the noise it was trained with; eta_scale 1 by default)
    noise     = z_{r,v} / (prior_std * sigma_f)    prior_std: the teacher's prior (1 unless it has one),
                sigma_f = RMS of z / prior_std over a fixed sample of rows, so the noise end is unit-variance
    data      = x_r (clean; uint8 where the source is 8-bit or fewer levels)

Shard s covers pair ids [s * R, (s + 1) * R). Process k of W builds the shards s with s % W == k;
a build resumes after its last complete shard, and the result is byte-identical to an
uninterrupted single-process build (same batches, same per-row noise).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from filelock import FileLock, Timeout

from nfm.core.config import AtLeast1, NonNegative, Range, Scale, added, check_choices
from nfm.core.data import DataConfig, ImageDataset
from nfm.core.distributed import process_state
from nfm.core.errors import NFMError
from nfm.core.io import check_free_space, save_tensors, write_json
from nfm.core.rundir import progress
from nfm.core.seeding import derive_seed
from nfm.pairs.format import (
    FORMAT_VERSION,
    INDEX_NAME,
    ShardFile,
    cache_key,
    cache_kind,
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
from nfm.teacher.protocol import Teacher, check_teacher, prior_std


@dataclass(frozen=True)
class PairBuildConfig:
    views: AtLeast1 = 1  # noise draws per image
    dtype: Literal["float16", "float32"] = "float16"  # noise storage
    seed: int = 0  # seeds every row's noise: eps = f(seed, row, view)
    batch_size: AtLeast1 = 256  # encode batch
    shard_mb: AtLeast1 = 256  # target shard size
    shard_rows: NonNegative = 0  # pairs per shard; 0: derived from shard_mb
    sigma_rows: AtLeast1 = 4096  # rows (view 0) used to estimate sigma_f
    # fraction of pairs that may be NaN/Inf (dropped and counted); more refuses
    max_nonfinite: Annotated[float, Range(min=0, max=1)] = 0.0
    split: Literal["train", "test"] = "train"
    # the noise added before encoding, as a multiple of the teacher's eta (0: clean images; 1: what it was
    # trained on; 2: twice that)
    eta_scale: Scale = added(1.0)
    # refuse at once a build the free disk under the cache root cannot hold (false: write until the disk is
    # full, stop with one line; the build resumes once there is room)
    check_space: bool = added(True)


def pair_eta(teacher: Teacher, cfg: PairBuildConfig) -> float:
    """The eta of the pairs: cfg.eta_scale x the teacher's."""
    return float(cfg.eta_scale * teacher.noise_std)


@dataclass(frozen=True)
class PairsRunConfig:
    data: DataConfig = field(default_factory=DataConfig)  # defaults to the teacher's own data
    pairs: PairBuildConfig = field(default_factory=PairBuildConfig)


NOISE_BLOCK = 256  # pair ids per noise block


def pair_noise(seed: int, ids: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """eps for pair ids `ids`: (n, *shape). Pair p takes row p % 256 of block p // 256, a standard-normal
    block drawn on the CPU from a generator seeded by (seed, block). So eps is a function of
    (seed, row, view) alone: not of the batch, the shard layout, the process or the device."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    blocks = ids // NOISE_BLOCK
    out = torch.empty(len(ids), *shape)
    for b in torch.unique(blocks).tolist():
        g = torch.Generator().manual_seed(derive_seed(seed, "noise", b))
        block = torch.randn(NOISE_BLOCK, *shape, generator=g)
        sel = blocks == b
        out[sel] = block[ids[sel] % NOISE_BLOCK]
    return out


def _uint8_ok(data: ImageDataset) -> bool:
    return 0 < getattr(data, "levels", 0) <= 255


@torch.no_grad()
def encode_pairs(
    teacher: Teacher, data: ImageDataset, ids: torch.Tensor, cfg: PairBuildConfig, scale: torch.Tensor | float, device
) -> dict[str, torch.Tensor]:
    """Encode the pairs with ids `ids` (one batch): noise = z / scale (prior_std * sigma_f, on the CPU)."""
    rows, views = ids // cfg.views, ids % cfg.views
    u, y = data.raw(rows.tolist())
    x = u.float() * (2.0 / data.levels) - 1.0
    eps = pair_noise(cfg.seed, ids, tuple(x.shape[1:]))
    yy = y.to(device) if teacher.num_classes else None
    z = teacher.encode((x + pair_eta(teacher, cfg) * eps).to(device), yy)
    if tuple(z.shape) != tuple(x.shape):
        raise NFMError(f"the teacher's encode returned shape {tuple(z.shape)} for images {tuple(x.shape)}")
    noise = z.float().cpu() / scale
    return {"noise": noise, "data": u if _uint8_ok(data) else x, "label": y, "index": rows, "view": views}


def estimate_sigma(
    teacher: Teacher, data: ImageDataset, cfg: PairBuildConfig, device, prior: torch.Tensor | float = 1.0
) -> float:
    """sigma_f = sqrt(mean (z / prior_std)^2) over ~sigma_rows pairs: whole noise blocks chosen by a seeded
    permutation."""
    total_pairs = len(data) * cfg.views
    n_blocks = math.ceil(total_pairs / NOISE_BLOCK)
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "sigma"))
    chosen = torch.randperm(n_blocks, generator=g)[: max(1, math.ceil(cfg.sigma_rows / NOISE_BLOCK))].sort().values
    ids = (chosen[:, None] * NOISE_BLOCK + torch.arange(NOISE_BLOCK)).flatten()
    ids = ids[ids < total_pairs]
    total, count = 0.0, 0
    for i in range(0, len(ids), cfg.batch_size):
        z = encode_pairs(teacher, data, ids[i : i + cfg.batch_size], cfg, prior, device)["noise"].double().flatten(1)
        z = z[torch.isfinite(z).all(1)]
        total, count = total + float(z.pow(2).sum()), count + z.numel()
    if count == 0:
        raise NFMError("every z in the sigma_f sample is NaN/Inf: the teacher is broken on this data")
    return math.sqrt(total / count)


def key_fields(teacher_fp: str, data: ImageDataset, eta: float, cfg: PairBuildConfig, shard_rows: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "teacher": teacher_fp,
        "data": data.fingerprint,
        "split": cfg.split,
        "eta": eta,
        "views": cfg.views,
        "seed": cfg.seed,
        "dtype": cfg.dtype,
        "data_dtype": "uint8" if _uint8_ok(data) else "float32",
        "sigma_rows": cfg.sigma_rows,
        "shard_rows": shard_rows,
        "max_nonfinite": cfg.max_nonfinite,
    }


def _shard_rows(data: ImageDataset, cfg: PairBuildConfig) -> int:
    return _shard_rows_for(data.image_shape, cfg, _uint8_ok(data))


def pair_bytes(shape: tuple[int, ...], cfg: PairBuildConfig, uint8: bool) -> int:
    """Bytes one pair takes in a shard: noise (cfg.dtype) + data (uint8 or float32) + label, index, view."""
    c, h, w = shape
    return c * h * w * ((2 if cfg.dtype == "float16" else 4) + (1 if uint8 else 4)) + 24


def estimate_cache_bytes(data: ImageDataset, cfg: PairBuildConfig) -> int:
    """The size of the cache `build_pairs(teacher, data, cfg)` writes (shard headers aside)."""
    return len(data) * cfg.views * pair_bytes(data.image_shape, cfg, _uint8_ok(data))


def _shard_rows_for(shape: tuple[int, ...], cfg: PairBuildConfig, uint8: bool) -> int:
    """Pairs per shard: cfg.shard_rows, or as many as fit in cfg.shard_mb."""
    if cfg.shard_rows > 0:
        return cfg.shard_rows
    return max(1, (cfg.shard_mb << 20) // pair_bytes(shape, cfg, uint8))


def _assemble_index(cache_dir: Path, base: dict[str, Any], num_shards: int, complete: bool) -> dict[str, Any]:
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


@dataclass(frozen=True)
class PairBuildResult:
    """What `build_pairs` did: reused a complete cache (hit) or built / finished it."""

    key: str
    path: Path  # CACHE_ROOT/KEY
    hit: bool  # True: the complete cache was there already; nothing was encoded
    total_rows: int  # pairs in the cache
    dropped: int  # pairs dropped as non-finite (over all shards)
    built_rows: int  # pairs this process encoded in this call


@dataclass
class _Plan:
    """Everything that determines the cache: its key, layout and index header."""

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
    ) -> _Plan:
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


def _check_inputs(teacher: Teacher, data: ImageDataset, cfg: PairBuildConfig) -> None:
    check_teacher(teacher, "the teacher")
    check_choices(cfg, "pairs.")
    if cfg.views < 1:
        raise NFMError(f"views must be >= 1, got {cfg.views}")
    if tuple(data.image_shape) != tuple(teacher.image_shape):
        raise NFMError(
            f"the data ({data.describe()}) does not match the teacher's image shape "
            f"{tuple(teacher.image_shape)}: build pairs on the data the teacher was trained for"
        )


def _plan(teacher: Teacher, data: ImageDataset, cfg: PairBuildConfig, cache_root: Path | None) -> _Plan:
    shard_rows = _shard_rows(data, cfg)
    fields = key_fields(teacher.fingerprint(), data, pair_eta(teacher, cfg), cfg, shard_rows)
    row_bytes = pair_bytes(data.image_shape, cfg, _uint8_ok(data))
    return _Plan.make(fields, len(data) * cfg.views, shard_rows, cache_root, row_bytes)


def _complete_index(cache_dir: Path, content: bool = False) -> dict[str, Any] | None:
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


def _index_header(
    plan: _Plan, teacher: Teacher, data: ImageDataset, cfg: PairBuildConfig, sigma: float, teacher_info: dict
) -> dict[str, Any]:
    c, h, w = data.image_shape
    return {
        "format_version": FORMAT_VERSION,
        "key": plan.key,
        "key_fields": plan.fields,
        "teacher": {"fingerprint": plan.fields["teacher"], **teacher_info},
        "data": {
            "name": data.name,
            **({"config": asdict(data.data_config)} if getattr(data, "data_config", None) is not None else {}),
            "split": cfg.split,
            "fingerprint": data.fingerprint,
            "rows": len(data),
            "levels": data.levels,
            "num_classes": data.num_classes,
        },
        "noise_std": pair_eta(teacher, cfg),  # the eta of these pairs (verify adds it back)
        "teacher_noise_std": float(teacher.noise_std),
        "sigma_f": sigma,
        "prior_std": "per-pixel" if getattr(teacher, "prior_std", None) is not None else "unit",
        "views": cfg.views,
        "seed": cfg.seed,
        "dtypes": {"noise": cfg.dtype, "data": plan.fields["data_dtype"], "label": "int64", "index": "int64"},
        "shapes": {"noise": [c, h, w], "data": [c, h, w]},
        "shard_rows": plan.shard_rows,
        "num_shards": plan.num_shards,
        "expected_rows": plan.total,
    }


def _too_many_nonfinite(dropped: int, cfg: PairBuildConfig, total: int, rows: list[int]) -> NFMError:
    allowed = int(cfg.max_nonfinite * total)
    example = f"; e.g. dataset rows {rows[:5]}" if rows else ""
    return NFMError(
        f"{dropped} pairs encode to NaN/Inf (allowed: {allowed} = pairs.max_nonfinite "
        f"{cfg.max_nonfinite} x {total}){example}. "
        "The teacher is unstable on this data (check it with `nfm teacher eval`), or raise "
        "max_nonfinite to drop such pairs. Nothing past the last complete shard was written"
    )


def _encode_shard(
    teacher: Teacher, data: ImageDataset, cfg: PairBuildConfig, plan: _Plan, s: int, scale, device, bar
) -> dict[str, torch.Tensor]:
    """Shard s as stored columns (noise in its storage dtype), non-finite pairs included."""
    ids_all = plan.shard_ids(s)
    parts = []
    for i in range(0, len(ids_all), cfg.batch_size):
        parts.append(encode_pairs(teacher, data, ids_all[i : i + cfg.batch_size], cfg, scale, device))
        bar.update(len(parts[-1]["label"]))
    shard = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    shard["noise"] = shard["noise"].to(torch.float16 if cfg.dtype == "float16" else torch.float32)
    return shard


def _write_shard(shard: dict[str, torch.Tensor], plan: _Plan, s: int, sigma: float, dropped: int) -> None:
    # one metadata entry: safetensors does not keep the order of several, and shards must be byte-exact
    provenance = {
        "key": plan.key,
        "shard": s + 1,
        "of": plan.num_shards,
        **({"teacher": plan.fields["teacher"]} if "teacher" in plan.fields else {"student": plan.fields["student"]}),
        "data": plan.fields["data"],
        "dropped": dropped,
        "sigma_f": sigma,
    }
    meta = {"nfm-pairs": json.dumps(provenance, sort_keys=True)}
    save_tensors(plan.cache_dir / shard_name(s, plan.num_shards), shard, metadata=meta)


def _sigma(teacher: Teacher, data: ImageDataset, cfg: PairBuildConfig, plan: _Plan, device, prior, log) -> float:
    """sigma_f of an interrupted build from its index, else estimated afresh."""
    if (plan.cache_dir / INDEX_NAME).is_file():
        index = read_index(plan.cache_dir)
        log(f"resuming pair cache {plan.key}: {len(index.get('shards', []))} of {plan.num_shards} shards present")
        return float(index["sigma_f"])
    t0 = time.perf_counter()
    sigma = estimate_sigma(teacher, data, cfg, device, prior)
    log(f"sigma_f = {sigma:.5f} (RMS of z over {min(cfg.sigma_rows, len(data))} rows, {time.perf_counter() - t0:.1f}s)")
    return sigma


def build_pairs(
    teacher: Teacher,
    data: ImageDataset,
    cfg: PairBuildConfig,
    cache_root: Path | None = None,
    teacher_info: dict[str, Any] | None = None,
    log=print,
    verify: bool = False,
) -> PairBuildResult:
    """Build (or resume, or reuse) the pair cache of (teacher, data, cfg). A reused cache is checked against
    its files; verify=True re-hashes their content too."""
    _check_inputs(teacher, data, cfg)
    state = process_state()
    device = state.device
    if isinstance(teacher, torch.nn.Module):
        teacher = teacher.to(device).eval()
    plan = _plan(teacher, data, cfg, cache_root)

    def prepare() -> tuple[dict[str, Any], Callable]:
        prior = prior_std(teacher)  # per-pixel prior std, or 1
        sigma = _sigma(teacher, data, cfg, plan, device, prior, log)
        header = _index_header(plan, teacher, data, cfg, sigma, teacher_info or {})
        return header, lambda s, bar: _encode_shard(teacher, data, cfg, plan, s, prior * sigma, device, bar)

    def vet(cache_dir: Path) -> dict[str, Any]:
        from nfm.pairs.verify import check_reconstruction

        return check_reconstruction(cache_dir, teacher)

    return _build(plan, cfg, state, prepare, verify, log, vet)


Vet = Callable[[Path], dict[str, Any]]  # check a complete cache against the model the build has; raise if it fails


def _build(plan: _Plan, cfg: PairBuildConfig, state, prepare, verify: bool, log, vet: Vet | None = None):
    """Every cache's build: under the key's lock, a hit if complete (a pulled cache only once `vet` passed on it),
    else prepare() -> (index header, encode_shard(s, bar)) and the missing shards of this process, then the
    index."""
    plan.cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(plan, state.is_main_process, log):
        state.wait_for_everyone()  # every process starts once the main one holds the key's lock
        return _build_locked(plan, cfg, state, prepare, verify, log, vet)


def _vet_foreign(plan: _Plan, vet: Vet | None, log) -> None:
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
def _build_lock(plan: _Plan, main: bool, log):
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


def _build_locked(plan: _Plan, cfg: PairBuildConfig, state, prepare, verify: bool, log, vet: Vet | None):
    rank, world = state.process_index, state.num_processes
    index = _complete_index(plan.cache_dir, content=verify)
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
    if state.is_main_process and cfg.check_space:
        plan.check_space()
    base, encode_shard = prepare()
    sigma = base["sigma_f"]
    if state.is_main_process:
        plan.cache_dir.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(plan.cache_dir)
        _assemble_index(plan.cache_dir, base, plan.num_shards, complete=False)
    state.wait_for_everyone()

    present = lambda s: (plan.cache_dir / shard_name(s, plan.num_shards)).is_file()  # noqa: E731
    mine = [s for s in range(plan.num_shards) if s % world == rank and not present(s)]
    allowed = int(cfg.max_nonfinite * plan.total)
    dropped_total = sum(s.get("dropped", 0) for s in read_index(plan.cache_dir).get("shards", []))
    bar = progress(sum(len(plan.shard_ids(s)) for s in mine), f"pairs {plan.key[:8]}", "pair",
                   main=state.is_main_process)  # fmt: skip
    t0 = time.perf_counter()
    for s in mine:
        shard = encode_shard(s, bar)
        finite = torch.isfinite(shard["noise"]).flatten(1).all(1)
        finite &= torch.isfinite(shard["data"].float()).flatten(1).all(1)
        dropped = int((~finite).sum())
        dropped_total += dropped  # this process's view: the shards present at start + its own
        if dropped_total > allowed:
            raise _too_many_nonfinite(dropped_total, cfg, plan.total, shard["index"][~finite].tolist())
        if dropped:
            log(f"shard {s + 1}: dropped {dropped} non-finite pairs")
            shard = {k: v[finite] for k, v in shard.items()}
        _write_shard(shard, plan, s, sigma, dropped)
        if state.is_main_process and world == 1:
            _assemble_index(plan.cache_dir, base, plan.num_shards, complete=False)
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        _finish(plan, base, cfg, bar.n / max(time.perf_counter() - t0, 1e-9) if mine else None, log)
    state.wait_for_everyone()
    index = read_index(plan.cache_dir)
    if not index.get("complete"):  # another process refused the cache (too many non-finite pairs)
        raise _too_many_nonfinite(index.get("dropped", 0), cfg, plan.total, [])
    return PairBuildResult(plan.key, plan.cache_dir, False, index["total_rows"], index.get("dropped", 0), bar.n)


def _finish(plan: _Plan, base: dict[str, Any], cfg: PairBuildConfig, rate: float | None, log) -> None:
    """Main process, after every process has written its shards: the index over all of them, marked
    complete only if every shard is there and the non-finite pairs of all processes together are allowed."""
    index = _assemble_index(plan.cache_dir, base, plan.num_shards, complete=False)
    if len(index["shards"]) != plan.num_shards:
        raise NFMError(f"pair cache {plan.cache_dir} is missing shards after the build; rerun it")
    if index["dropped"] > int(cfg.max_nonfinite * plan.total):
        return  # left incomplete: every process raises after the barrier
    index = _assemble_index(plan.cache_dir, base, plan.num_shards, complete=True)
    speed = f", {rate:.0f} pairs/s" if rate else ""
    log(
        f"pair cache built: {plan.key} ({index['total_rows']} pairs, {index['dropped']} dropped{speed}) "
        f"at {plan.cache_dir}"
    )


def cache_summary(cache_dir: Path) -> dict[str, Any]:
    index = read_index(cache_dir)
    origin = read_origin(cache_dir)
    return {
        "key": index["key"],
        "kind": cache_kind(index),
        "teacher": index["teacher"]["fingerprint"],
        "data": f"{index['data']['name']}[{index['data']['split']}]",
        "rows": index["total_rows"],
        "views": index["views"],
        "dtype": index["dtypes"]["noise"],
        "size_mb": round(sum(s["bytes"] for s in index["shards"]) / 2**20, 2),
        "complete": bool(index.get("complete")),
        "origin": "built here"
        if origin is None
        else ("checked" if origin.get("verified") else "FOREIGN") + (f" ({origin.get('source')})"),
        "path": str(cache_dir),
    }
