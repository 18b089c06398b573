"""`nfm pairs verify`: re-hash every shard, then check the pairs against the model that made them.

What a cache's bytes cannot show is that they are what its index says made them: a cache whose noise was
zeroed and whose checksums were recomputed hashes fine. So verification regenerates pairs with a model the
*user* names (a cache's recorded teacher is provenance, never a loader spec: nothing read from a cache is
imported or called):

    teacher pairs   decode(noise * sigma_f * prior_std, y) ~= x + eta * eps      (--teacher SPEC)
    reflow pairs    generate(z, y) == x, batch by batch as the build made them   (--from-student RUN)
    logit caches    classifier(view) == logits                                    (--teacher RUN)

on a seeded sample of rows from every shard (every row with `rows=None`). A pulled cache is marked foreign
(pairs/format.py ORIGIN_NAME) until such a check passes; `mark_verified` records it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from nfm.core.errors import NFMError
from nfm.core.io import write_json
from nfm.pairs.build import pair_noise
from nfm.pairs.format import (
    ORIGIN_NAME,
    ShardFile,
    check_index,
    check_key,
    read_index,
    read_origin,
    safe_member,
)
from nfm.teacher.protocol import Teacher, prior_std, teacher_device

TOLERANCE = 0.1  # worst |decode(noise) - (x + eta * eps)| a verified teacher cache may show (float16 noise)


def check_shards(cache_dir: Path) -> list[str]:
    """Problems found by checking every claim of the index against the shards, content included (empty: all
    good)."""
    index = read_index(cache_dir)
    problems = check_index(cache_dir, index, content=True)
    if not index.get("complete"):
        problems.append(f"the cache is incomplete ({len(index['shards'])} of {index.get('num_shards')} shards)")
    return problems


def require_intact(cache_dir: Path) -> dict[str, Any]:
    """The index of a cache whose every shard matches it, content included; else one error listing the problems."""
    problems = check_shards(cache_dir)
    if problems:
        name = Path(cache_dir).name
        raise NFMError(
            f"pair cache {name} failed verification: {'; '.join(problems[:4])}"
            + (f" (+{len(problems) - 4} more)" if len(problems) > 4 else "")
            + f". Rebuild it: nfm pairs rm {name}, then nfm pairs build"
        )
    return read_index(cache_dir)


def sampled_shards(
    cache_dir: Path, index: dict[str, Any], per_shard: int | None, seed: int = 0
) -> Iterator[tuple[ShardFile, list[int]]]:
    """(shard, sorted rows) for every shard: `per_shard` rows drawn by a seeded permutation, or every row (None)."""
    g = torch.Generator().manual_seed(seed)
    for s in index["shards"]:
        sf = ShardFile(safe_member(cache_dir, s["file"]))
        if per_shard is None:
            yield sf, list(range(sf.rows))
        else:
            yield sf, torch.randperm(sf.rows, generator=g)[: max(1, per_shard)].sort().values.tolist()


def read_rows(sf: ShardFile, take: list[int], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The given rows of a shard's columns, read in runs of consecutive rows."""
    out: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    i = 0
    while i < len(take):
        j = i
        while j + 1 < len(take) and take[j + 1] == take[j] + 1:
            j += 1
        for k in names:
            out[k].append(sf.read(k, take[i], take[j] + 1))
        i = j + 1
    return {k: torch.cat(v) for k, v in out.items()}


def row_errors(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Each row's worst |got - want| (n,), NaN/Inf counted as inf: a check can never pass on a NaN."""
    err = (got.float() - want.float()).abs().flatten(1).max(1).values
    return torch.where(torch.isfinite(err), err, torch.full_like(err, float("inf")))


@torch.no_grad()
def reconstruction_error(
    cache_dir: Path, teacher: Teacher, samples: int | None = 64, seed: int = 0, batch_size: int = 256
) -> dict[str, Any]:
    """Worst |decode(noise * sigma_f * prior_std, y) - (x + eta * eps)| over `samples` pairs spread over every
    shard (at least one per shard; None: every pair)."""
    index = read_index(cache_dir)
    check_key(cache_dir, index)
    recorded = index["key_fields"]["teacher"]  # the key proves this one, not index["teacher"]
    if teacher.fingerprint() != recorded:
        raise NFMError(
            f"teacher fingerprint {teacher.fingerprint()} is not the cache's ({recorded}): verify with the teacher "
            "that built it"
        )
    device = teacher_device(teacher)
    prior = prior_std(teacher)
    per = None if samples is None else max(1, samples // len(index["shards"]))
    worst, mean, n = 0.0, 0.0, 0
    levels, uint8 = index["data"]["levels"], index["dtypes"]["data"] == "uint8"
    sigma, eta, views = float(index["sigma_f"]), float(index["noise_std"]), int(index["views"])
    for sf, take in sampled_shards(cache_dir, index, per, seed):
        for a in range(0, len(take), batch_size):
            cols = read_rows(sf, take[a : a + batch_size], ("noise", "data", "label", "index", "view"))
            x = cols["data"].float() * (2.0 / levels) - 1.0 if uint8 else cols["data"].float()
            eps = pair_noise(index["seed"], cols["index"] * views + cols["view"], tuple(x.shape[1:]))
            target = x + eta * eps
            z = cols["noise"].float() * sigma * prior
            y = cols["label"].to(device) if teacher.num_classes else None
            rec = teacher.decode(z.to(device), y).cpu()
            err = row_errors(rec, target)
            worst, mean, n = max(worst, float(err.max())), mean + float(err.sum()), n + len(err)
    return {"pairs_checked": n, "worst_abs_error": worst, "mean_max_abs_error": mean / max(n, 1)}


def mark_verified(cache_dir: Path, how: dict[str, Any]) -> None:
    """Record on a pulled cache that it was checked against the user's own model (clears its foreign mark)."""
    origin = read_origin(cache_dir)
    if origin is not None:
        write_json(Path(cache_dir) / ORIGIN_NAME, {**origin, "verified": {"at": time.time(), **how}})


def refuse_above(rec: dict[str, Any], tolerance: float, what: str, checked: str, verdict: str) -> None:
    """A recomputation's worst error (rec: worst_abs_error), refused in one line above `tolerance`."""
    if not rec["worst_abs_error"] <= tolerance:
        raise NFMError(
            f"{what} by up to {rec['worst_abs_error']:.3g} (tolerance {tolerance:g}) over {checked}: {verdict}. "
            "Remove the cache (nfm pairs rm) and build it again"
        )


def check_reconstruction(
    cache_dir: Path, teacher: Teacher, samples: int | None = 64, tolerance: float = TOLERANCE
) -> dict[str, Any]:
    """reconstruction_error, refused (one line) above `tolerance`."""
    rec = reconstruction_error(cache_dir, teacher, samples)
    what = f"pair cache {Path(cache_dir).name}: decoding its noise through the teacher misses x + eta * eps"
    refuse_above(rec, tolerance, what, f"{rec['pairs_checked']} pairs", "these are not this teacher's pairs")
    return {"check": "reconstruction", "teacher": teacher.fingerprint(), **rec}
