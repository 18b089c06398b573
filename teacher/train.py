"""Stage one: train a TarFlow teacher by maximum likelihood on noise-augmented data x + eta * eps.

    loss = E[ 0.5 |z|^2 + (D/2) log 2 pi - log|det dz/dx| ] / D,   z = f(x + eta * eps)   (nats per dim)

Labels are dropped to -1 with probability `label_drop`, so the model also learns the
unconditional density that classifier-free guidance contrasts against.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from nfm.core.config import check_choices, format_table, to_dict
from nfm.core.data import DataConfig, ImageDataset, load_data
from nfm.core.distributed import process_state
from nfm.core.errors import NFMError
from nfm.core.loop import TrainConfig, train
from nfm.core.metrics import nll_to_bpd
from nfm.core.rundir import log_config, setup_logger
from nfm.core.sampling import sample_and_save, sample_inputs
from nfm.core.seeding import BatchRandom
from nfm.teacher.export import save_export
from nfm.teacher.model import Guidance, TarFlow, TarFlowConfig
from nfm.teacher.protocol import prior_std, teacher_device


@dataclass(frozen=True)
class TeacherSampleConfig:
    n: int = 100  # preview grid size
    guidance: float = 0.0  # classifier-free guidance weight for previews
    temperature: float = 1.0  # prior temperature: z ~ N(0, temperature^2 diag(prior_std^2))
    denoise: bool = True  # apply the score step after decoding
    seed: int = 1234  # fixed preview noise


@dataclass(frozen=True)
class TeacherRunConfig:
    model: TarFlowConfig = field(default_factory=TarFlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: TeacherSampleConfig = field(default_factory=TeacherSampleConfig)
    label_drop: float = 0.1  # P(label -> -1) during training, for classifier-free guidance


def teacher_loss(eta: float, label_drop: float):
    """The maximum-likelihood loss on x + eta * eps, in nats per dimension (logs bits/dim too)."""

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, ...], rng: BatchRandom):
        x, y = batch
        eps = rng.randn(*x.shape[1:]).to(x.device)
        if label_drop > 0:
            drop = rng.rand().to(y.device) < label_drop
            y = torch.where(drop, torch.full_like(y, -1), y)
        z, logdet = model(x + eta * eps, y)
        d = x[0].numel()
        nll = 0.5 * z.float().flatten(1).pow(2).sum(1) + 0.5 * d * math.log(2 * math.pi) - logdet
        loss = nll.mean() / d
        return loss, {"bpd": nll_to_bpd(loss.detach())}

    return loss_fn


@torch.no_grad()
def sample_grid(model: TarFlow, scfg: TeacherSampleConfig, path: Path) -> torch.Tensor:
    """The preview grid: fixed noise through the prior (x temperature), decoded (and denoised)."""

    device = teacher_device(model)

    def sampler(z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        x = model.decode(z, y, guidance=Guidance(scfg.guidance))
        return model.denoise(x, y) if scfg.denoise and model.noise_std > 0 else x

    prior = scfg.temperature * prior_std(model)
    inputs = sample_inputs(scfg.n, model.image_shape, model.num_classes, seed=scfg.seed, prior=prior, device=device)
    return sample_and_save(sampler, inputs, model.num_classes, path)


@torch.no_grad()
def evaluate_bpd(
    model: TarFlow, data: ImageDataset, batch_size: int = 500, eta: float | None = None, seed: int = 0
) -> float:
    """Mean bits/dim of x + eta * eps over a split (eta defaults to the model's own noise_std)."""
    device = teacher_device(model)
    eta = model.noise_std if eta is None else eta
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for i in range(0, len(data), batch_size):
        x, y = data.__getitems__(list(range(i, min(i + batch_size, len(data)))))
        x = x + eta * torch.randn(x.shape, generator=g)
        bpd = nll_to_bpd(-model.log_prob(x.to(device), y.to(device) if model.num_classes else None) / x[0].numel())
        total, n = total + float(bpd.sum()), n + x.shape[0]
    return total / n


def resolve(cfg: TeacherRunConfig, data: ImageDataset) -> TeacherRunConfig:
    c, h, w = data.image_shape
    if h != w:
        raise NFMError(f"TarFlow needs square images; {data.describe()}. Set data.image_size to crop them")
    model = cfg.model.resolved(c, h, data.num_classes)
    if (model.in_channels, model.img_size) != (c, h):
        raise NFMError(
            f"model.in_channels={model.in_channels}, model.img_size={model.img_size} disagree with the data "
            f"({data.describe()}); leave them at 0 to take them from the data"
        )
    if model.num_classes not in (0, data.num_classes):
        raise NFMError(
            f"model.num_classes={model.num_classes} but the data has {data.num_classes} classes; "
            "use -1 (from the data) or 0 (unconditional)"
        )
    model.validate()
    if not 0 <= cfg.label_drop < 1:
        raise NFMError(f"label_drop must be in [0, 1), got {cfg.label_drop}")
    return replace(cfg, model=model)


def run_teacher_training(cfg: TeacherRunConfig, run_dir: Path, echo_config: bool = True) -> Path:
    """`nfm teacher train`: train (or resume) in run_dir; returns the export directory."""
    run_dir = Path(run_dir)
    check_choices(cfg)
    data = load_data(cfg.data, "train")
    cfg = resolve(cfg, data)
    log = setup_logger(run_dir, main=process_state().is_main_process)  # one log, by the main process
    log_config(log, format_table(cfg, f"nfm teacher train -> {run_dir}"), echo_config)
    log.info(data.describe())
    torch.manual_seed(cfg.train.seed)
    model = TarFlow(cfg.model)

    def export(ema_model: TarFlow, directory: Path, step: int) -> None:
        held_out = load_data(cfg.data, "test")
        bpd = evaluate_bpd(ema_model, held_out)
        log.info(f"held-out bits/dim (EMA, {held_out.describe()}): {bpd:.4f}")
        save_export(
            ema_model,
            directory,
            step,
            extra={
                "data": asdict(cfg.data),
                "test_bpd": bpd,
                "data_fingerprint": data.fingerprint,
                **({"class_names": list(data.class_names)} if data.class_names else {}),
            },  # fmt: skip
        )

    export_dir = train(
        run_dir=run_dir,
        cfg=cfg.train,
        model=model,
        dataset=data,
        loss_fn=teacher_loss(cfg.model.noise_std, cfg.label_drop if cfg.model.num_classes else 0.0),
        resolved_config=to_dict(cfg),
        export_fn=export,
        sample_fn=lambda m, path: sample_grid(m, cfg.sample, path),
        desc="teacher",
        log=log,
    )
    return export_dir
