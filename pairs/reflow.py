"""Stage two from a trained flow instead of a teacher: reflow pairs (Rectified Flow, Liu et al. 2022).

For pair id p (p = 0 .. n-1):

    z_p  = pair_noise(seed, p)  rounded to the stored noise dtype     the same noise blocks as teacher caches
    y_p  = p mod num_classes    (-1 for an unconditional model)       balanced classes
    x_p  = generator.generate(z_p, y_p)                                an ODE solve of a trained student

into the same pair-cache format as a teacher's pairs (shards, index, checksums, the key's lock, resume,
shards split over processes), so a student trains on it exactly as on teacher pairs. The stored noise is
exactly the solver's input (rounded before the solve), and a pair's x depends only on its batch of the
build (ids [i * batch_size, (i + 1) * batch_size) of its shard): a resumed or multi-process build is
byte-identical to an uninterrupted one on the same device. sigma_f = 1: the noise is the generator's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from nfm.core.config import check_choices
from nfm.core.distributed import process_state
from nfm.core.errors import NFMError
from nfm.pairs.build import PairBuildConfig, limits, pair_bytes, pair_noise, shard_rows_of
from nfm.pairs.format import FORMAT_VERSION
from nfm.pairs.writer import CachePlan, PairBuildResult, write_cache


@runtime_checkable
class Generator(Protocol):
    """A trained noise -> data map (a student and its solver)."""

    image_shape: tuple[int, int, int]
    num_classes: int

    def generate(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """(b, *image_shape) noise and (b,) labels on the device -> (b, *image_shape) images."""
        ...

    def fingerprint(self) -> str:
        """Changes whenever the map changes: the weights, the config and the solver settings."""
        ...

    def provenance(self) -> dict[str, Any]:
        """What the index records: the model's path and fingerprint, solver, steps, NFE per sample, its data."""
        ...


def reflow_key_fields(gen: Generator, n: int, cfg: PairBuildConfig, shard_rows: int) -> dict[str, Any]:
    prov = gen.provenance()
    return {
        "format_version": FORMAT_VERSION,
        "kind": "reflow",
        "student": gen.fingerprint(),
        "data": prov.get("data_name", ""),
        "n": n,
        "seed": cfg.seed,
        "dtype": cfg.dtype,
        "batch_size": cfg.batch_size,  # a pair's x depends on its batch
        "shard_rows": shard_rows,
        "max_nonfinite": cfg.max_nonfinite,
    }


def _plan(gen: Generator, n: int, cfg: PairBuildConfig, cache_root: Path | None) -> CachePlan:
    shard_rows = shard_rows_of(gen.image_shape, cfg, uint8=False)
    row_bytes = pair_bytes(gen.image_shape, cfg, uint8=False)
    return CachePlan.make(reflow_key_fields(gen, n, cfg, shard_rows), n, shard_rows, cache_root, row_bytes)


def _header(plan: CachePlan, gen: Generator, cfg: PairBuildConfig) -> dict[str, Any]:
    c, h, w = gen.image_shape
    prov = gen.provenance()
    own = {
        "provenance": {"kind": "student", "fingerprint": plan.fields["student"], **prov},
        "teacher": {"fingerprint": f"student:{plan.fields['student']}", "source": prov.get("path", "")},
        "data": {
            "name": f"reflow of {prov.get('data_name', '?')}",
            "split": "generated",
            "fingerprint": plan.fields["data"],
            "rows": plan.total,
            "levels": 0,
            "num_classes": gen.num_classes,
        },
        "noise_std": 0.0,
        "sigma_f": 1.0,
        "prior_std": "unit",
        "views": 1,
        "seed": cfg.seed,
    }
    shapes = {"noise": [c, h, w], "data": [c, h, w]}
    return plan.header("reflow", own, shapes=shapes, dtypes={"noise": cfg.dtype, "data": "float32"})


def reflow_inputs(ids: torch.Tensor, cfg: PairBuildConfig, gen: Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise in its stored dtype, labels) of pair ids: what `generate` is given (as float32)."""
    dtype = torch.float16 if cfg.dtype == "float16" else torch.float32
    z = pair_noise(cfg.seed, ids, tuple(gen.image_shape)).to(dtype)
    y = ids % gen.num_classes if gen.num_classes else torch.full_like(ids, -1)
    return z, y


@torch.no_grad()
def _generate_shard(
    gen: Generator, cfg: PairBuildConfig, plan: CachePlan, s: int, device, bar
) -> dict[str, torch.Tensor]:
    ids_all = plan.shard_ids(s)
    parts = []
    for i in range(0, len(ids_all), cfg.batch_size):
        ids = ids_all[i : i + cfg.batch_size]
        z, y = reflow_inputs(ids, cfg, gen)
        x = gen.generate(z.float().to(device), y.to(device) if gen.num_classes else None)
        if tuple(x.shape) != tuple(z.shape):
            raise NFMError(f"the generator returned shape {tuple(x.shape)} for noise {tuple(z.shape)}")
        parts.append({"noise": z, "data": x.float().cpu(), "label": y, "index": ids, "view": torch.zeros_like(ids)})
        bar.update(len(ids))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def build_reflow_pairs(
    gen: Generator, n: int, cfg: PairBuildConfig, cache_root: Path | None = None, log=print, verify: bool = False
) -> PairBuildResult:
    """Build (or resume, or reuse) the reflow cache of n pairs (z, generate(z)) of a trained generator."""
    check_choices(cfg, "pairs.")
    if n < 1:
        raise NFMError(f"the number of reflow pairs must be >= 1, got {n}")
    state = process_state()
    plan = _plan(gen, n, cfg, cache_root)

    source = _ReflowShards(gen, cfg, plan, state.device, log)
    return write_cache(
        plan, source, limits(cfg), state, log, verify, lambda d: check_regeneration(d, gen, state.device)
    )


@dataclass
class _ReflowShards:
    """The ShardSource of a reflow cache: ODE solves of the generator from the pairs' noise."""

    gen: Generator
    cfg: PairBuildConfig
    plan: CachePlan
    device: Any
    log: Any

    def header(self) -> dict[str, Any]:
        where = self.gen.provenance().get("path", "a student")
        self.log(f"reflow pairs from {where}: {self.plan.total} ODE solves ({self.plan.key})")
        return _header(self.plan, self.gen, self.cfg)

    def encode(self, s: int, bar) -> dict[str, torch.Tensor]:
        return _generate_shard(self.gen, self.cfg, self.plan, s, self.device, bar)


@torch.no_grad()
def regeneration_error(
    cache_dir: Path, gen: Generator, device="cpu", batches: int | None = 1, seed: int = 0
) -> dict[str, Any]:
    """Worst |generate(z, y) - x| over `batches` build batches drawn (seeded) from every shard, or over every
    batch (None), each regenerated whole as the build made it (a pair's x depends on its batch): 0 on the
    device that built the cache. Pairs dropped as non-finite are regenerated with their batch and skipped."""
    from nfm.pairs.format import ShardFile, check_key, read_index, safe_member
    from nfm.pairs.verify import row_errors

    index = read_index(cache_dir)
    check_key(cache_dir, index)
    fields = index["key_fields"]
    if fields.get("kind") != "reflow":
        raise NFMError(f"pair cache {cache_dir.name} holds teacher pairs, not reflow pairs")
    if gen.fingerprint() != fields["student"]:
        raise NFMError(
            f"the student's fingerprint {gen.fingerprint()} (with this solver) is not the cache's "
            f"({fields['student']}): verify with the student and solver that built it"
        )
    cfg = PairBuildConfig(seed=fields["seed"], dtype=fields["dtype"])
    bs, shard_rows, g = int(fields["batch_size"]), int(fields["shard_rows"]), torch.Generator().manual_seed(seed)
    worst, checked, noise_equal = 0.0, 0, True
    for s, entry in enumerate(index["shards"]):
        sf = ShardFile(safe_member(cache_dir, entry["file"]))
        stored_ids = sf.read("index")
        lo = s * shard_rows
        hi = min(lo + shard_rows, int(fields["n"]))
        starts = list(range(lo, hi, bs))  # the build's batches of this shard: ids [a, min(a + bs, hi))
        if batches is not None:
            starts = sorted(starts[i] for i in torch.randperm(len(starts), generator=g)[:batches].tolist())
        for a in starts:
            ids = torch.arange(a, min(a + bs, hi))
            z, y = reflow_inputs(ids, cfg, gen)
            x = gen.generate(z.float().to(device), y.to(device) if gen.num_classes else None).float().cpu()
            rows = torch.searchsorted(stored_ids, ids)  # where each id sits in the shard (ids are sorted)
            there = (rows < len(stored_ids)) & (stored_ids[rows.clamp(max=len(stored_ids) - 1)] == ids)
            if not there.any():
                continue
            r0, r1 = int(rows[there][0]), int(rows[there][-1]) + 1
            stored_x, stored_z = sf.read("data", r0, r1).float(), sf.read("noise", r0, r1)
            noise_equal &= bool(torch.equal(stored_z, z[there]))
            worst = max(worst, float(row_errors(x[there], stored_x).max()))
            checked += int(there.sum())
    return {"pairs_checked": checked, "noise_equal": noise_equal, "worst_abs_error": worst}


def check_regeneration(
    cache_dir: Path, gen: Generator, device="cpu", batches: int | None = 1, tolerance: float = 0.1
) -> dict[str, Any]:
    """regeneration_error, refused (one line) above `tolerance` or if the stored noise is not the build's."""
    rec = regeneration_error(cache_dir, gen, device, batches)
    if not rec["noise_equal"] or not rec["worst_abs_error"] <= tolerance:
        what = (
            "its noise is not the build's"
            if not rec["noise_equal"]
            else (f"regenerated images differ by up to {rec['worst_abs_error']:.3g} (tolerance {tolerance:g})")
        )
        raise NFMError(
            f"reflow pair cache {Path(cache_dir).name}: {what} over {rec['pairs_checked']} pairs: these are not "
            "this student's pairs. Remove the cache (nfm pairs rm) and build it again"
        )
    return {"check": "regeneration", "student": gen.fingerprint(), **rec}
