"""`nfm pairs verify`: re-hash every shard, then check decode(noise * sigma_f) ~= x + eta * eps on a sample."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nfm.pairs.build import pair_noise
from nfm.pairs.format import ShardFile, check_index, read_index, safe_member
from nfm.pipeline.core.errors import NFMError
from nfm.teacher.protocol import Teacher, prior_std, teacher_device


def check_shards(cache_dir: Path) -> list[str]:
    """Problems found by checking every claim of the index against the shards, content included (empty: all
    good)."""
    index = read_index(cache_dir)
    problems = check_index(cache_dir, index, content=True)
    if not index.get("complete"):
        problems.append(f"the cache is incomplete ({len(index['shards'])} of {index.get('num_shards')} shards)")
    return problems


@torch.no_grad()
def reconstruction_error(cache_dir: Path, teacher: Teacher, samples: int = 64, seed: int = 0) -> dict[str, Any]:
    """Worst |decode(noise * sigma_f * prior_std, y) - (x + eta * eps)| over `samples` pairs spread over the shards."""
    index = read_index(cache_dir)
    if teacher.fingerprint() != index["teacher"]["fingerprint"]:
        raise NFMError(
            f"teacher fingerprint {teacher.fingerprint()} is not the cache's "
            f"({index['teacher']['fingerprint']}): verify with the teacher that built it"
        )
    device = teacher_device(teacher)
    prior = prior_std(teacher)
    g = torch.Generator().manual_seed(seed)
    per = max(1, samples // len(index["shards"]))
    worst, mean, n = 0.0, 0.0, 0
    levels, uint8 = index["data"]["levels"], index["dtypes"]["data"] == "uint8"
    for s in index["shards"]:
        sf = ShardFile(safe_member(cache_dir, s["file"]))
        take = torch.randperm(sf.rows, generator=g)[:per].sort().values.tolist()
        cols = {
            k: torch.stack([sf.read(k, i, i + 1)[0] for i in take]) for k in ("noise", "data", "label", "index", "view")
        }
        x = cols["data"].float() * (2.0 / levels) - 1.0 if uint8 else cols["data"].float()
        eps = pair_noise(index["seed"], cols["index"] * index["views"] + cols["view"], tuple(x.shape[1:]))
        target = x + index["noise_std"] * eps
        z = cols["noise"].float() * index["sigma_f"] * prior
        y = cols["label"].to(device) if teacher.num_classes else None
        rec = teacher.decode(z.to(device), y).cpu()
        err = (rec - target).abs().flatten(1).max(1).values
        worst, mean, n = max(worst, float(err.max())), mean + float(err.sum()), n + len(err)
    return {"pairs_checked": n, "worst_abs_error": worst, "mean_max_abs_error": mean / max(n, 1)}
