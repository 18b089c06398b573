"""Stage one for knowledge transfer (FM-KT): a classifier teacher, trained with the loop every stage shares.

A small ResNet (He et al. 2016: 3x3 basic blocks, three stages of doubling width, global average pooling;
group norm instead of batch norm, so the loop's EMA of the parameters is the whole model) trained by
cross-entropy on randomly shifted and flipped images. Its export is the same kind of directory as a flow
teacher's: model.safetensors + config.json (model config, data, held-out accuracy), and its fingerprint
(a hash of the weights) keys the logit caches built from it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from nfm.core.augment import AugmentConfig, augment, draw_augment
from nfm.core.config import AtLeast1, check_choices, format_table, from_dict, to_dict
from nfm.core.data import DataConfig, ImageDataset, load_data
from nfm.core.distributed import process_state
from nfm.core.errors import NFMError
from nfm.core.io import read_export, write_export
from nfm.core.loop import TrainConfig, train
from nfm.core.rundir import setup_logger
from nfm.core.seeding import BatchRandom


@dataclass(frozen=True)
class ClassifierConfig:
    width: AtLeast1 = 32  # channels of the first stage (doubled at each of the next two)
    blocks: AtLeast1 = 2  # basic blocks per stage
    in_channels: int = 0  # 0: from the data
    img_size: int = 0
    num_classes: int = 0


@dataclass(frozen=True)
class ClassifierRunConfig:
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    label_smoothing: float = 0.0
    kind: Literal["resnet"] = "resnet"


def _norm(c: int) -> nn.Module:
    return nn.GroupNorm(math.gcd(8, c), c)  # 8 groups where the width allows, else the largest that divides it


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = _norm(c_out)
        self.skip = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.skip(x))


class ResNetClassifier(nn.Module):
    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        if cfg.in_channels < 1 or cfg.num_classes < 2:
            raise NFMError("a classifier needs labelled data (num_classes >= 2) with a known channel count")
        self.cfg = cfg
        w = cfg.width
        self.stem = nn.Sequential(nn.Conv2d(cfg.in_channels, w, 3, 1, 1, bias=False), _norm(w), nn.ReLU())
        layers, c = [], w
        for stage, width in enumerate((w, 2 * w, 4 * w)):
            for b in range(cfg.blocks):
                layers.append(_Block(c, width, 2 if stage > 0 and b == 0 else 1))
                c = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, cfg.num_classes)

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().float().numpy().tobytes())
        return h.hexdigest()[:16]


def classifier_loss(aug: AugmentConfig, label_smoothing: float):
    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, ...], rng: BatchRandom):
        x, y = batch
        shift, flip = draw_augment(aug, x.shape[0], rng.rand)
        logits = model(augment(x, shift.to(x.device), flip.to(x.device)))
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        return loss, {"acc": (logits.argmax(1) == y).float().mean()}

    return loss_fn


@torch.no_grad()
def accuracy(model: nn.Module, data: ImageDataset, batch: int = 1000, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy on a split (eval mode)."""
    model.eval()
    right = 0
    for a in range(0, len(data), batch):
        x, y = data.__getitems__(list(range(a, min(a + batch, len(data)))))
        right += int((model(x.to(device)).argmax(1).cpu() == y).sum())
    return right / max(len(data), 1)


def resolve(cfg: ClassifierRunConfig, data: ImageDataset) -> ClassifierRunConfig:
    if not data.num_classes:
        raise NFMError(f"{data.name} has no labels: a classifier teacher needs labelled data (data.use_labels=true)")
    c, h, _ = data.image_shape
    m = from_dict(ClassifierConfig, {**asdict(cfg.model), "in_channels": c, "img_size": h,
                                     "num_classes": data.num_classes})  # fmt: skip
    return from_dict(ClassifierRunConfig, {**to_dict(cfg), "model": asdict(m)})


def save_classifier(model: ResNetClassifier, directory: Path, extra: dict[str, Any]) -> Path:
    config = {"model": asdict(model.cfg), "fingerprint": model.fingerprint(), **extra}
    return write_export(directory, model.state_dict(), "classifier", config)


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[ResNetClassifier, dict[str, Any]]:
    """A classifier export (or its run directory): the model in eval mode and its config.json."""
    p, meta, state = read_export(path, "classifier", "classifier", "nfm kt teacher train")
    model = ResNetClassifier(from_dict(ClassifierConfig, meta["model"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise NFMError(f"{p}/model.safetensors does not fit its config.json: {str(e).splitlines()[0]}") from e
    return model.to(device).eval(), meta


def run_classifier_training(cfg: ClassifierRunConfig, run_dir: Path) -> Path:
    """`nfm kt teacher train`: train (or resume) in run_dir; returns the export directory."""
    run_dir = Path(run_dir)
    check_choices(cfg)
    data = load_data(cfg.data, "train")
    cfg = resolve(cfg, data)
    log = setup_logger(run_dir, main=process_state().is_main_process)
    log.info(format_table(cfg, f"nfm kt teacher train -> {run_dir}"))
    log.info(data.describe())
    torch.manual_seed(cfg.train.seed)
    model = ResNetClassifier(cfg.model)

    def export(ema_model: ResNetClassifier, directory: Path, step: int) -> None:
        acc = accuracy(ema_model, load_data(cfg.data, "test"))
        log.info(f"held-out accuracy (EMA): {acc:.4f}")
        save_classifier(ema_model, directory, {"step": step, "data": asdict(cfg.data), "test_accuracy": acc,
                                               "data_fingerprint": data.fingerprint})  # fmt: skip

    return train(
        run_dir=run_dir,
        cfg=cfg.train,
        model=model,
        dataset=data,
        loss_fn=classifier_loss(cfg.augment, cfg.label_smoothing),
        resolved_config=to_dict(cfg),
        export_fn=export,
        desc="kt teacher",
        log=log,
    )
