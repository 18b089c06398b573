"""Stage three for knowledge transfer: a small classifier trained on a teacher's logit cache, by FM-KT.

FM-KT (Shao et al., "Precise Knowledge Transfer via Flow Matching", arXiv 2402.02012) puts a small
*meta-encoder* g on the student's feature map z. Along a probability path from z (t = 0) to a representation
whose head output is the teacher's (t = 1), K serial steps each predict the end point and score it:

    x_{t_0} = sigma_0 z,    t_k = k / K
    xhat_k  = z - g(x_{t_k} + e(t_k))                  the end point predicted at step k
    out_k   = head(xhat_k)                              logits of step k
    x_{t_{k+1}} = alpha_{t_{k+1}} xhat_k + sigma_{t_{k+1}} z       (the path, its source end known)

    loss = (1/K) sum_k [ kd_weight * KD(out_k, teacher logits) + ce_weight * CE(out_k, label) ]
    prediction = (1/K) sum_k out_k                      (the implicit ensemble of the K steps)

The path is one of the student stage's (student/paths.py, alpha_t x + sigma_t z): `rf` = linear (rectified
flow), `vp`, `ve`. KD is any metric on logits: `kl` (Hinton et al.: T^2 KL(p_T(teacher) || p_T(student)))
or `dist` (Huang et al. 2022: inter- and intra-class Pearson relations). The baselines are the same student
trained without the teacher (`none`, cross-entropy) and with vanilla KD on its own head (`kd`).

OFM-KT (`ofm-kt`), the paper's online variant, has no pre-trained teacher: the teacher is the student's own
implicit ensemble, trained with it. Each step's logits are pulled by the KD metric toward the detached mean
of the K steps' logits (as `OnlineFlowAlignModule` in the authors' code), beside the cross-entropy:

    loss = (1/K) sum_k [ kd_weight * KD(out_k, stopgrad(mean_j out_j)) + ce_weight * CE(out_k, label) ]

so it trains on a logit cache's views and labels and ignores its logits. The authors smooth the labels there
(0.1 spread over the other classes, which is torch's `label_smoothing` = 0.1 C / (C - 1)); `label_smoothing`
is torch's convention and applies to the cross-entropy of every method.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from nfm.core.augment import AugmentConfig, draw_views
from nfm.core.config import AtLeast1, Fraction, Positive, Scale, added, check_choices, from_dict, to_dict
from nfm.core.data import ImageDataset
from nfm.core.errors import NFMError
from nfm.core.io import read_export, write_export
from nfm.core.loop import TrainConfig, train
from nfm.core.seeding import BatchRandom
from nfm.pairs.reader import PairCache, logits_column, require_kind
from nfm.student.paths import ProbPath

SCHEDULES = {"rf": "linear", "vp": "vp", "ve": "ve"}
FLOW_METHODS = ("fm-kt", "ofm-kt")  # the methods with a meta-encoder and a K-step sampler


@dataclass(frozen=True)
class KTModelConfig:
    width: AtLeast1 = 16  # backbone channels (then 2 x width at 1/2 and 1/4 resolution)
    in_channels: int = 0  # 0: from the cache
    img_size: int = 0
    num_classes: int = 0


@dataclass(frozen=True)
class KTConfig:
    method: Literal["none", "kd", "fm-kt", "ofm-kt"] = "fm-kt"
    schedule: Literal["rf", "vp", "ve"] = "rf"
    steps: AtLeast1 = 4  # K, the serial steps of FM-KT in training (evaluation sweeps K = 1, 2, 4, 8)
    kd_loss: Literal["kl", "dist"] = "kl"
    temperature: Positive = 4.0  # of the kl loss
    kd_weight: Scale = 1.0
    ce_weight: Scale = 1.0
    label_smoothing: Fraction = added(0.0)  # of the cross-entropy, as torch's F.cross_entropy
    ve_sigma_min: Positive = 0.01
    ve_sigma_max: Positive = 20.0


@dataclass(frozen=True)
class KTStudentRunConfig:
    model: KTModelConfig = field(default_factory=KTModelConfig)
    kt: KTConfig = field(default_factory=KTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pairs: str = ""  # the logit cache: key, key prefix or directory


def _norm(c: int) -> nn.Module:
    return nn.GroupNorm(math.gcd(8, c), c)  # 8 groups where the width allows, else the largest that divides it


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    return F.pad(emb, (0, dim - 2 * half))


class KTStudent(nn.Module):
    """Backbone (three 3x3 conv layers, two of stride 2) -> feature map z; head = global average pool + linear;
    for FM-KT also the meta-encoder (SiLU, 3x3 conv, group norm, SiLU, 3x3 conv on the feature channels, as in
    the paper's CNN meta-encoder) and its time embedding."""

    def __init__(self, cfg: KTModelConfig, kt: KTConfig):
        super().__init__()
        if cfg.in_channels < 1 or cfg.num_classes < 2:
            raise NFMError("a KT student needs its data's channels and at least two classes")
        self.cfg, self.kt = cfg, kt
        w, c = cfg.width, 2 * cfg.width
        self.backbone = nn.Sequential(
            nn.Conv2d(cfg.in_channels, w, 3, 1, 1), _norm(w), nn.ReLU(),
            nn.Conv2d(w, c, 3, 2, 1), _norm(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, 2, 1), _norm(c), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(c, cfg.num_classes)
        if kt.method in FLOW_METHODS:
            self.meta = nn.Sequential(
                nn.SiLU(), nn.Conv2d(c, c, 3, 1, 1, bias=False), _norm(c), nn.SiLU(), nn.Conv2d(c, c, 3, 1, 1)
            )  # fmt: skip
            self.time = nn.Sequential(nn.Linear(c, c), nn.SiLU(), nn.Linear(c, c))
            self.path = ProbPath(SCHEDULES[kt.schedule], kt.ve_sigma_min, kt.ve_sigma_max)

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def logits_of(self, feat: torch.Tensor) -> torch.Tensor:
        return self.head(feat.mean((2, 3)))

    def trajectory(self, x: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """The K = steps logits out_k of FM-KT's serial sampler (one, the plain head, for none / kd)."""
        z = self.backbone(x)
        if self.kt.method not in FLOW_METHODS:
            return [self.logits_of(z)]
        t0 = torch.zeros((), dtype=z.dtype, device=z.device)
        xt = self.path.coefficients(t0)[1] * z
        outs = []
        for k in range(steps):
            t = torch.full((z.shape[0],), k / steps, dtype=z.dtype, device=z.device)
            e = self.time(timestep_embedding(t, z.shape[1]))[:, :, None, None]
            xhat = z - self.meta(xt + e)
            outs.append(self.logits_of(xhat))
            alpha, sigma = self.path.coefficients(torch.full((), (k + 1) / steps, dtype=z.dtype, device=z.device))[:2]
            xt = alpha * xhat + sigma * z
        return outs

    def forward(self, x: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Class logits: the mean of the K steps' logits (FM-KT), or the head's."""
        return torch.stack(self.trajectory(x, steps or self.kt.steps)).mean(0)


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.: T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over the batch."""
    log_p_s = F.log_softmax(student / temperature, 1)
    log_p_t = F.log_softmax(teacher / temperature, 1)
    return temperature**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()


def _pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(
    student: torch.Tensor, teacher: torch.Tensor, beta: float = 2.0, gamma: float = 2.0, eps: float = 1e-8
) -> torch.Tensor:
    """DIST (Huang et al. 2022) at temperature 1: beta (1 - mean Pearson over each sample's class probabilities)
    + gamma (1 - mean Pearson over each class's probabilities across the batch)."""
    p_s, p_t = student.softmax(1), teacher.softmax(1)
    return beta * (1 - _pearson(p_s, p_t, eps).mean()) + gamma * (1 - _pearson(p_s.T, p_t.T, eps).mean())


def kt_loss(kt: KTConfig):
    """(model, (x, teacher logits, labels), rng) -> (loss, logs) for the method in `kt`."""

    def kd(out: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return kl_loss(out, teacher, kt.temperature) if kt.kd_loss == "kl" else dist_loss(out, teacher)

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, ...], rng: BatchRandom):
        x, teacher, y = batch
        outs = model.trajectory(x, kt.steps)
        pred = torch.stack(outs).mean(0)
        if kt.method == "ofm-kt":
            teacher = pred.detach()  # online: the K steps' ensemble teaches each step
        terms = []
        for out in outs:
            term = kt.ce_weight * F.cross_entropy(out, y, label_smoothing=kt.label_smoothing)
            if kt.method != "none":
                term = term + kt.kd_weight * kd(out, teacher)
            terms.append(term)
        loss = torch.stack(terms).mean()
        return loss, {"acc": (pred.argmax(1) == y).float().mean()}

    return loss_fn


class KTPairs(torch.utils.data.Dataset):
    """A logit cache in memory (verified on read): (image view in [-1, 1], teacher logits, label) rows."""

    def __init__(self, cache: PairCache):
        require_kind(cache.dir, cache.index, ("kt",), "a KT student")
        logits = logits_column(cache.index)
        cols = {"data": [], logits: [], "label": []}
        for i, entry in enumerate(cache.shards):
            shard = cache.shard(i)
            out = {k: shard.empty(k) for k in cols}
            shard.read_verified(entry, out)
            for k in cols:
                cols[k].append(out[k])
        self.cache = cache
        self.data, self.logits, self.labels = (torch.cat(cols[k]) for k in ("data", logits, "label"))
        self.image_shape = tuple(self.data.shape[1:])
        self.num_classes = self.logits.shape[1]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, idx: list[int]) -> tuple[torch.Tensor, ...]:
        i = torch.as_tensor(idx, dtype=torch.long)
        return self.cache.to_float(self.data[i]), self.logits[i], self.labels[i]


class KTViews(torch.utils.data.Dataset):
    """The rows a logit cache of (data, views, seed, augment) holds, in its order, drawn on the fly and without a
    teacher: (view in [-1, 1], no logits (a (batch, 0) tensor), label). For the students that need no teacher
    (none, and OFM-KT, whose teacher is its own ensemble): they read the very views a cached run reads."""

    def __init__(self, data: ImageDataset, views: int, seed: int, augment: AugmentConfig):
        if views < 1:
            raise NFMError(f"kt views: views must be >= 1, got {views}")
        if not 0 < data.levels <= 255:
            raise NFMError(f"{data.name}: KT views are grey levels; this source has {data.levels}")
        self.data, self.views, self.seed, self.augment = data, views, seed, augment
        self.image_shape, self.num_classes = tuple(data.image_shape), data.num_classes

    def __len__(self) -> int:
        return len(self.data) * self.views

    def settings(self) -> dict[str, Any]:
        return {"views": self.views, "seed": self.seed, "augment": asdict(self.augment)}

    def __getitems__(self, idx: list[int]) -> tuple[torch.Tensor, ...]:
        out = draw_views(self.data, torch.as_tensor(idx, dtype=torch.long), self.views, self.augment, self.seed)
        x = out["data"].float() * (2.0 / self.data.levels) - 1.0
        return x, torch.empty(len(idx), 0), out["label"]  # no logits: a loss that reads them fails on the shape


@torch.no_grad()
def accuracy_text(acc: dict[str, float]) -> str:
    """{"1": 0.9192, "4": 0.95} -> "91.92 % at K = 1, 95.00 % at K = 4" (K: sampler steps)."""
    return ", ".join(f"{v:.2%} at K = {k}".replace("%", " %") for k, v in acc.items())


def accuracy_at(model: KTStudent, data: ImageDataset, steps: list[int], batch: int = 1000) -> dict[int, float]:
    """Top-1 accuracy of the student with K sampler steps, for each K in `steps` (one entry for none / kd)."""
    model.eval()
    ks = steps if model.kt.method in FLOW_METHODS else [1]
    right = dict.fromkeys(ks, 0)
    device = next(model.parameters()).device
    for a in range(0, len(data), batch):
        x, y = data.__getitems__(list(range(a, min(a + batch, len(data)))))
        z = x.to(device)
        for k in ks:
            right[k] += int((model(z, k).argmax(1).cpu() == y).sum())
    return {k: right[k] / max(len(data), 1) for k in ks}


def flops(fn) -> int:
    """The FLOPs of fn() as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def compute_cost(model: KTStudent, steps: list[int]) -> dict[str, Any]:
    """What one image costs the student: its parameters, the FLOPs of a prediction with K sampler steps for each K
    in `steps`, and of one training step (forward and backward of its loss). FLOPs as torch's FlopCounterMode
    counts them: 2 per multiply-add of convolutions and matrix products; norms and activations are left out."""
    cfg = model.cfg
    device = next(model.parameters()).device
    n = 2  # FLOPs are linear in the batch; a batch of 2 keeps a group norm over one value per channel defined
    x = torch.zeros(n, cfg.in_channels, cfg.img_size, cfg.img_size, device=device)
    ks = steps if model.kt.method in FLOW_METHODS else [1]
    with torch.no_grad():
        inference = {str(k): flops(lambda k=k: model(x, k)) // n for k in ks}
    batch = (x, torch.zeros(n, cfg.num_classes, device=device), torch.zeros(n, dtype=torch.long, device=device))
    train_step = flops(lambda: kt_loss(model.kt)(model, batch, None)[0].backward()) // n
    model.zero_grad(set_to_none=True)
    return {"parameters": sum(p.numel() for p in model.parameters()), "inference_flops": inference,
            "train_flops_per_image": train_step}  # fmt: skip


TEACHERLESS = ("none", "ofm-kt")  # the methods that read no teacher logits


def resolve(cfg: KTStudentRunConfig, rows: KTPairs | KTViews) -> KTStudentRunConfig:
    c, h, _ = rows.image_shape
    m = {**asdict(cfg.model), "in_channels": c, "img_size": h, "num_classes": rows.num_classes}
    source = str(rows.cache.dir) if isinstance(rows, KTPairs) else ""
    return from_dict(KTStudentRunConfig, {**to_dict(cfg), "model": m, "pairs": source})


def save_kt_student(model: KTStudent, directory: Path, extra: dict[str, Any]) -> Path:
    config = {"model": asdict(model.cfg), "kt": asdict(model.kt), **extra}
    return write_export(directory, model.state_dict(), "kt-student", config)


def load_kt_student(path: str | Path, device: str | torch.device = "cpu") -> tuple[KTStudent, dict[str, Any]]:
    _, meta, state = read_export(path, "kt-student", "KT student", "nfm kt student train")
    model = KTStudent(from_dict(KTModelConfig, meta["model"]), from_dict(KTConfig, meta["kt"]))
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def run_kt_student_training(
    cfg: KTStudentRunConfig,
    run_dir: Path,
    pairs: PairCache | KTViews,
    held_out: ImageDataset | None = None,
    log=None,
) -> Path:
    """`nfm kt student train`: train (or resume) a KT student on a logit cache, or, for the methods that need
    no teacher (none, ofm-kt), on the same views drawn on the fly (KTViews); returns its export."""
    from nfm.core.config import format_table
    from nfm.core.distributed import process_state
    from nfm.core.rundir import setup_logger

    check_choices(cfg)
    if isinstance(pairs, KTViews) and cfg.kt.method not in TEACHERLESS:
        raise NFMError(
            f"--method {cfg.kt.method} learns from a teacher's logits: give a logit cache with --pairs KEY (build "
            "one with `nfm kt pairs build --teacher RUN`); only none and ofm-kt train without one"
        )
    data = pairs if isinstance(pairs, KTViews) else KTPairs(pairs)
    cfg = resolve(cfg, data)
    log = log or setup_logger(Path(run_dir), main=process_state().is_main_process)
    log.info(format_table(cfg, f"nfm kt student train -> {run_dir}"))
    torch.manual_seed(cfg.train.seed)
    model = KTStudent(cfg.model, cfg.kt)
    if isinstance(pairs, KTViews):
        data_cfg = asdict(pairs.data.data_config) if getattr(pairs.data, "data_config", None) else None
        source = None
    else:
        data_cfg, source = pairs.index["data"].get("config"), pairs.key

    def export(ema_model: KTStudent, directory: Path, step: int) -> None:
        extra: dict[str, Any] = {"step": step, "pairs": source, "data": data_cfg}
        if held_out is not None:
            acc = accuracy_at(ema_model, held_out, [ema_model.kt.steps])
            extra["test_accuracy"] = acc
            log.info(f"held-out accuracy (EMA): {accuracy_text(acc)}")
        save_kt_student(ema_model, directory, extra)

    return train(
        run_dir=Path(run_dir),
        cfg=cfg.train,
        model=model,
        dataset=data,
        loss_fn=kt_loss(cfg.kt),
        # drawn on the fly, the views' settings are part of the run: a resume with others is refused
        resolved_config=to_dict(cfg) | ({"views": pairs.settings(), "data": data_cfg} if source is None else {}),
        export_fn=export,
        desc=f"kt student[{cfg.kt.method}]",
        log=log,
        sample_shape=data.image_shape,
    )
