"""Stage two for knowledge transfer (FM-KT): the classifier teacher's outputs, cached per image and view.

The same sharded, content-addressed, resumable cache as the flow pairs (pairs/format.py, written by the same
pairs.writer), of kind `kt`, with the columns:

    logits  the teacher's logits for the row's view (float32, (num_classes,)): the target end of the transfer
            (a cache written before the format declared its columns keeps them under `noise`: logits_column)
    data    the view itself: the training image shifted and flipped as `augment` drew it (stored grey levels)
    label   the true class; index: the training image; view: 0 = the image itself, v >= 1 an augmented view

View v of image r is a pure function of (seed, r, v), so a student reads exactly the images the teacher saw,
and the logits are the teacher's, bit for bit (computed once, in eval mode, in float32).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nfm.core import augment as views_
from nfm.core.augment import AugmentConfig, draw_views
from nfm.core.data import ImageDataset
from nfm.core.distributed import process_state
from nfm.core.errors import NFMError
from nfm.pairs.build import PairBuildConfig, limits, pair_bytes, shard_rows_of
from nfm.pairs.format import FORMAT_VERSION, logits_column
from nfm.pairs.writer import CachePlan, PairBuildResult, data_header, write_cache


@dataclass(frozen=True)
class KTPairConfig:
    views: int = 2  # views per image: view 0 is the image itself, the others augmented
    seed: int = 0  # seeds every view's shift and flip
    batch_size: int = 500  # teacher batch
    shard_mb: int = 256
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)


def view_params(cfg: KTPairConfig, rows: torch.Tensor, views: torch.Tensor, n_rows: int):
    """(shift, flip) of the given (row, view) pairs of a cache built with `cfg`."""
    return views_.view_params(cfg.augment, cfg.seed, rows, views, n_rows)


@torch.no_grad()
def kt_rows(classifier: nn.Module, data: ImageDataset, ids: torch.Tensor, cfg: KTPairConfig, device) -> dict:
    """The cache columns of pair ids `ids`."""
    out = draw_views(data, ids, cfg.views, cfg.augment, cfg.seed)
    x = out["data"].float() * (2.0 / data.levels) - 1.0
    return {"logits": classifier(x.to(device)).float().cpu(), **out}


def build_kt_pairs(
    classifier: nn.Module,
    data: ImageDataset,
    cfg: KTPairConfig,
    cache_root: Path | None = None,
    teacher_info: dict[str, Any] | None = None,
    log=print,
) -> PairBuildResult:
    """Build (or resume, or reuse) the logit cache of (classifier, data, cfg)."""
    if not 0 < data.levels <= 255:
        raise NFMError(f"{data.name}: a logit cache stores its views as grey levels; this source has {data.levels}")
    if cfg.views < 1:
        raise NFMError(f"kt pairs: views must be >= 1, got {cfg.views}")
    state = process_state()
    device = state.device
    classifier = classifier.to(device).eval()
    k = int(getattr(classifier, "num_classes", 0))
    if k != data.num_classes:
        raise NFMError(f"the classifier has {k} classes, {data.name} has {data.num_classes}: build on its own data")
    build = PairBuildConfig(views=cfg.views, dtype="float32", batch_size=cfg.batch_size, shard_mb=cfg.shard_mb)
    shard_rows = shard_rows_of(data.image_shape, build, uint8=True)
    fields = {
        "format_version": FORMAT_VERSION,
        "kind": "kt",
        "teacher": classifier.fingerprint(),
        "data": data.fingerprint,
        "split": "train",
        "views": cfg.views,
        "seed": cfg.seed,
        "augment": asdict(cfg.augment),
        "shard_rows": shard_rows,
    }
    row_bytes = pair_bytes(data.image_shape, build, uint8=True)
    plan = CachePlan.make(fields, len(data) * cfg.views, shard_rows, cache_root, row_bytes)
    source = _LogitShards(classifier, data, cfg, plan, device, teacher_info or {})
    vet = lambda d: check_logits(d, classifier)  # noqa: E731
    return write_cache(plan, source, limits(build), state, log, vet=vet)


@dataclass
class _LogitShards:
    """The ShardSource of a logit cache: each view of each image and the classifier's logits of it."""

    classifier: nn.Module
    data: ImageDataset
    cfg: KTPairConfig
    plan: CachePlan
    device: Any
    teacher_info: dict[str, Any]

    def header(self) -> dict[str, Any]:
        c, h, w = self.data.image_shape
        own = {
            "teacher": {"fingerprint": self.plan.fields["teacher"], **self.teacher_info},
            "data": data_header(self.data, "train"),
            "views": self.cfg.views,
            "seed": self.cfg.seed,
            "augment": asdict(self.cfg.augment),
        }
        shapes = {"logits": [int(self.data.num_classes)], "data": [c, h, w]}
        return self.plan.header("kt", own, shapes=shapes, dtypes={"logits": "float32", "data": "uint8"})

    def encode(self, s: int, bar) -> dict[str, torch.Tensor]:
        ids_all, parts = self.plan.shard_ids(s), []
        for i in range(0, len(ids_all), self.cfg.batch_size):
            parts.append(kt_rows(self.classifier, self.data, ids_all[i : i + self.cfg.batch_size], self.cfg,
                                 self.device))  # fmt: skip
            bar.update(len(parts[-1]["label"]))
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def logit_error(cache_dir: Path, classifier: nn.Module, samples: int | None = 256, seed: int = 0) -> dict[str, Any]:
    """Recompute the teacher's logits of `samples` rows drawn (seeded) from every shard (None: every row) from the
    stored views: the worst absolute difference (0 for an intact cache and the same teacher on the same device)."""
    from nfm.pairs.reader import PairCache
    from nfm.pairs.verify import read_rows, row_errors, sampled_shards

    cache, worst, checked = PairCache(cache_dir, kinds=("kt",)), 0.0, 0  # kind and key checked on open
    fields = cache.index["key_fields"]
    if classifier.fingerprint() != fields["teacher"]:
        raise NFMError(
            f"the classifier's fingerprint {classifier.fingerprint()} is not the cache's ({fields['teacher']}): "
            "verify with the classifier that built it"
        )
    classifier = classifier.eval()
    device = next(classifier.parameters()).device
    logits = logits_column(cache.index)
    for shard, take in sampled_shards(cache.dir, cache.index, samples, seed):
        for a in range(0, len(take), 512):
            cols = read_rows(shard, take[a : a + 512], ("data", logits))
            with torch.no_grad():
                got = classifier(cache.to_float(cols["data"]).to(device)).float().cpu()
            worst = max(worst, float(row_errors(got, cols[logits]).max()))
            checked += len(cols[logits])
    return {"rows_checked": checked, "worst_abs_error": worst}


def check_logits(cache_dir: Path, classifier: nn.Module, samples: int | None = 256, tolerance: float = 1e-2):
    """logit_error, refused (one line) above `tolerance`."""
    from nfm.pairs.verify import refuse_above

    rec = logit_error(cache_dir, classifier, samples)
    what = f"logit cache {Path(cache_dir).name}: the classifier's logits differ from the stored ones"
    refuse_above(rec, tolerance, what, f"{rec['rows_checked']} rows", "these are not this classifier's logits")
    return {"check": "logits", "teacher": classifier.fingerprint(), **rec}
