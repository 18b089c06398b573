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

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch

from nfm.core.config import AtLeast1, NonNegative, Range, Scale, added, check_choices
from nfm.core.data import DataConfig, ImageDataset
from nfm.core.distributed import process_state
from nfm.core.errors import NFMError
from nfm.core.seeding import derive_seed
from nfm.pairs.format import FORMAT_VERSION, INDEX_NAME, cache_kind, columns_of, read_index, read_origin
from nfm.pairs.writer import (  # noqa: F401 (PairBuildResult: re-exported for the callers of build_pairs)
    CachePlan,
    PairBuildResult,
    WriteLimits,
    data_header,
    shard_rows_for,
    write_cache,
)
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


def shard_rows_of(shape: tuple[int, ...], cfg: PairBuildConfig, uint8: bool) -> int:
    """Pairs per shard: cfg.shard_rows, or as many as fit in cfg.shard_mb."""
    return shard_rows_for(pair_bytes(shape, cfg, uint8), cfg.shard_rows, cfg.shard_mb)


def pair_bytes(shape: tuple[int, ...], cfg: PairBuildConfig, uint8: bool) -> int:
    """Bytes one pair takes in a shard: noise (cfg.dtype) + data (uint8 or float32) + label, index, view."""
    c, h, w = shape
    return c * h * w * ((2 if cfg.dtype == "float16" else 4) + (1 if uint8 else 4)) + 24


def estimate_cache_bytes(data: ImageDataset, cfg: PairBuildConfig) -> int:
    """The size of the cache `build_pairs(teacher, data, cfg)` writes (shard headers aside)."""
    return len(data) * cfg.views * pair_bytes(data.image_shape, cfg, _uint8_ok(data))


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


def _plan(teacher: Teacher, data: ImageDataset, cfg: PairBuildConfig, cache_root: Path | None) -> CachePlan:
    shard_rows = shard_rows_of(data.image_shape, cfg, _uint8_ok(data))
    fields = key_fields(teacher.fingerprint(), data, pair_eta(teacher, cfg), cfg, shard_rows)
    row_bytes = pair_bytes(data.image_shape, cfg, _uint8_ok(data))
    return CachePlan.make(fields, len(data) * cfg.views, shard_rows, cache_root, row_bytes)


def _index_header(
    plan: CachePlan, teacher: Teacher, data: ImageDataset, cfg: PairBuildConfig, sigma: float, teacher_info: dict
) -> dict[str, Any]:
    c, h, w = data.image_shape
    own = {
        "teacher": {"fingerprint": plan.fields["teacher"], **teacher_info},
        "data": data_header(data, cfg.split),
        "noise_std": pair_eta(teacher, cfg),  # the eta of these pairs (verify adds it back)
        "teacher_noise_std": float(teacher.noise_std),
        "sigma_f": sigma,
        "prior_std": "per-pixel" if getattr(teacher, "prior_std", None) is not None else "unit",
        "views": cfg.views,
        "seed": cfg.seed,
    }
    dtypes = {"noise": cfg.dtype, "data": plan.fields["data_dtype"]}
    return plan.header("teacher", own, shapes={"noise": [c, h, w], "data": [c, h, w]}, dtypes=dtypes)


def _encode_shard(
    teacher: Teacher, data: ImageDataset, cfg: PairBuildConfig, plan: CachePlan, s: int, scale, device, bar
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


def _sigma(teacher: Teacher, data: ImageDataset, cfg: PairBuildConfig, plan: CachePlan, device, prior, log) -> float:
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
    source = _TeacherShards(teacher, data, cfg, plan, device, teacher_info or {}, log)

    def vet(cache_dir: Path) -> dict[str, Any]:
        from nfm.pairs.verify import check_reconstruction

        return check_reconstruction(cache_dir, teacher)

    return write_cache(plan, source, limits(cfg), state, log, verify, vet)


def limits(cfg: PairBuildConfig) -> WriteLimits:
    return WriteLimits(max_nonfinite=cfg.max_nonfinite, check_space=cfg.check_space)


@dataclass
class _TeacherShards:
    """The ShardSource of a teacher's pairs: sigma_f first (from an interrupted build's index, else a pass over
    sigma_rows rows), then shard s's encodings scaled by 1 / (prior_std sigma_f)."""

    teacher: Teacher
    data: ImageDataset
    cfg: PairBuildConfig
    plan: CachePlan
    device: Any
    teacher_info: dict[str, Any]
    log: Callable
    scale: Any = None

    def header(self) -> dict[str, Any]:
        prior = prior_std(self.teacher)  # per-pixel prior std, or 1
        sigma = _sigma(self.teacher, self.data, self.cfg, self.plan, self.device, prior, self.log)
        self.scale = prior * sigma
        return _index_header(self.plan, self.teacher, self.data, self.cfg, sigma, self.teacher_info)

    def encode(self, s: int, bar) -> dict[str, torch.Tensor]:
        return _encode_shard(self.teacher, self.data, self.cfg, self.plan, s, self.scale, self.device, bar)


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
        "dtype": index["dtypes"][columns_of(index)[0]],  # the noise's, or a logit cache's logits'
        "size_mb": round(sum(s["bytes"] for s in index["shards"]) / 2**20, 2),
        "complete": bool(index.get("complete")),
        "origin": "built here"
        if origin is None
        else ("checked" if origin.get("verified") else "FOREIGN") + (f" ({origin.get('source')})"),
        "path": str(cache_dir),
    }
