"""How soft the preset teacher's targets are: mean largest probability and entropy of softmax(logits / T) over
the first 20,000 rows of each seed's logit cache (keys from report.json), at T = 1 and T = 4 (vanilla KD's).

    NFM_CACHE_DIR=/tmp/nfmcache python docs/results/fm-kt/fashion-mnist/teacher_softness.py [REPORT_DIR]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from nfm.pairs.lookup import default_cache_root, find_cache
from nfm.pairs.reader import PairCache

here = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
for seed, result in enumerate(json.loads((here / "report.json").read_text())["per_seed"]):
    cache = PairCache(find_cache(result["cache"], default_cache_root()))
    logits = torch.as_tensor(cache.shard(0).read("noise", 0, min(20000, cache.shard(0).rows))).double()
    for t in (1.0, 4.0):
        p = (logits / t).softmax(1)
        entropy = -(p * p.clamp_min(1e-300).log()).sum(1).mean().item()
        print(
            f"seed {seed}, T = {t:g}: mean largest probability {p.max(1).values.mean().item():.3f}, "
            f"entropy {entropy:.3f} nats of log {p.shape[1]} = {math.log(p.shape[1]):.3f}"
        )
