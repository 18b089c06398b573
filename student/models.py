"""Velocity networks v(x_t, t, y): an MLP (flat data, tests) and a SiT/DiT-style transformer.

Both take x_t (b, C, H, W), t (b,) in [0, 1] and labels y (b,) with -1 = the null class of
classifier-free guidance (a learned embedding of its own), and return a velocity shaped like x_t.
With `model.interval` they take a step length h (b,) as well (`h=`): the average velocity over [t, t + h] of
a one-step student (student/meanflow.py); its embedding starts at zero, so at h = 0 such a network is a plain
velocity network, and one without the input loads and samples as before.
The transformer conditions every block on (time + class) with adaLN-zero, so each block
starts as the identity and the output layer starts at zero.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal

import torch
from einops import rearrange
from torch import nn

from nfm.core.config import ShapedByData, added, check_choices
from nfm.core.errors import NFMError
from nfm.student.names import STUDENT_SIZES  # noqa: F401 (re-exported)

Arch = Literal["dit", "mlp", "conv"]
ARCHS: tuple[str, ...] = typing.get_args(Arch)


@dataclass(frozen=True)
class StudentModelConfig(ShapedByData):
    arch: Arch = "dit"  # dit | mlp | conv
    in_channels: int = 0  # 0: from the data
    img_size: int = 0  # 0: from the data
    num_classes: int = -1  # -1: from the data; 0: unconditional
    patch_size: int = 2  # dit
    width: int = 128  # dit: transformer width; mlp: hidden width; conv: channels
    depth: int = 4  # dit: blocks; mlp: hidden layers; conv: residual blocks
    heads: int = 4  # dit
    mlp_ratio: float = 4.0  # dit
    class_dropout: float = 0.1  # P(label -> null) during training, for classifier-free guidance
    interval: bool = added(False)  # a second time input, the step length h (MeanFlow / shortcut students)

    def validate(self) -> None:
        check_choices(self, "model.")
        problems = []
        if self.in_channels <= 0 or self.img_size <= 0:
            problems.append("in_channels and img_size must be set (> 0)")
        if self.arch == "dit":
            if self.img_size % self.patch_size:
                problems.append(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
            if self.width % self.heads or (self.width // self.heads) % 2:
                problems.append(f"width={self.width} must split into {self.heads} heads of even width")
        if self.num_classes < 0:
            problems.append("num_classes is unresolved (-1)")
        if not 0 <= self.class_dropout < 1:
            problems.append(f"class_dropout={self.class_dropout} must be in [0, 1)")
        if problems:
            raise NFMError("invalid student config: " + "; ".join(problems))


# Named sizes (DiT-style); data-dependent fields come from the data.


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 as in DiT), (b,) -> (b, dim)."""
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32  # float64 stays exact (the tests)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = 1000.0 * t.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Conditioning(nn.Module):
    """c = MLP(sinusoid(t)) + class embedding (row num_classes = the null class) [+ MLP(sinusoid(h)): the step
    length of an interval student, its last layer zero at the start]."""

    def __init__(self, width: int, num_classes: int, freq_dim: int = 256, interval: bool = False):
        super().__init__()
        self.freq_dim = freq_dim
        self.time = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.num_classes = num_classes
        self.classes = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.step = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width)) if interval else None
        if self.step is not None:
            nn.init.zeros_(self.step[2].weight)
            nn.init.zeros_(self.step[2].bias)

    def forward(self, t: torch.Tensor, y: torch.Tensor | None, h: torch.Tensor | None = None) -> torch.Tensor:
        c = self.time(timestep_embedding(t, self.freq_dim).to(self.time[0].weight.dtype))
        if self.step is not None:
            h = torch.zeros_like(t) if h is None else h
            c = c + self.step(timestep_embedding(h, self.freq_dim).to(self.step[0].weight.dtype))
        elif h is not None:
            raise NFMError("this student has no step-length input (model.interval): sample it with a plain solver")
        if self.classes is not None:
            if y is None:
                y = torch.full((t.shape[0],), -1, dtype=torch.long, device=t.device)
            c = c + self.classes(torch.where(y < 0, self.num_classes, y))
        return c


class MLPVelocity(nn.Module):
    def __init__(self, cfg: StudentModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.in_channels * cfg.img_size**2
        self.cond = Conditioning(cfg.width, cfg.num_classes, interval=cfg.interval)
        self.inp = nn.Linear(d, cfg.width)
        self.hidden = nn.ModuleList(nn.Linear(cfg.width, cfg.width) for _ in range(cfg.depth))
        self.out = nn.Linear(cfg.width, d)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, h: torch.Tensor | None = None
    ) -> torch.Tensor:
        c = self.cond(t, y, h)
        h = self.inp(x.flatten(1)) + c
        for layer in self.hidden:
            h = layer(nn.functional.silu(h)) + c
        return self.out(nn.functional.silu(h)).view_as(x)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))  # adaLN-zero
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)  # (b, width) each
        h = modulate(self.norm1(x), shift1, scale1)
        x = x + gate1[:, None] * self.attn(h, h, h, need_weights=False)[0]
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiTVelocity(nn.Module):
    """SiT/DiT: patchify -> linear embed + learned positions -> adaLN-zero blocks -> linear -> unpatchify."""

    def __init__(self, cfg: StudentModelConfig):
        super().__init__()
        self.cfg = cfg
        p, w = cfg.patch_size, cfg.width
        tokens = (cfg.img_size // p) ** 2
        self.embed = nn.Linear(cfg.in_channels * p * p, w)
        self.pos = nn.Parameter(torch.randn(1, tokens, w) * 0.02)
        self.cond = Conditioning(w, cfg.num_classes, interval=cfg.interval)
        self.blocks = nn.ModuleList(DiTBlock(w, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))
        self.out = nn.Linear(w, cfg.in_channels * p * p)
        for m in (self.ada[1], self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, h: torch.Tensor | None = None
    ) -> torch.Tensor:
        p, s = self.cfg.patch_size, self.cfg.img_size // self.cfg.patch_size
        tok = self.embed(rearrange(x, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p)) + self.pos  # (b, t, w)
        c = self.cond(t, y, h)  # (b, w)
        for block in self.blocks:
            tok = block(tok, c)
        shift, scale = self.ada(c).chunk(2, dim=-1)
        tok = self.out(modulate(self.norm(tok), shift, scale))  # (b, t, c*p*p)
        return rearrange(tok, "b (h w) (c p1 p2) -> b c (h p1) (w p2)", h=s, w=s, p1=p, p2=p)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv -> FiLM(time + class) -> SiLU -> conv (zero-initialised), residual."""

    def __init__(self, ch: int, cond: int):
        super().__init__()
        groups = 8 if ch % 8 == 0 else 1
        self.norm1, self.conv1 = nn.GroupNorm(groups, ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.film = nn.Linear(cond, 2 * ch)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        scale, shift = self.film(c)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return x + self.conv2(nn.functional.silu(h))


class ConvVelocity(nn.Module):
    """A residual conv net at full resolution with FiLM conditioning: the small-image student."""

    def __init__(self, cfg: StudentModelConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.width
        self.cond = Conditioning(ch, cfg.num_classes, interval=cfg.interval)
        self.inp = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(ch, ch) for _ in range(cfg.depth))
        self.norm = nn.GroupNorm(8 if ch % 8 == 0 else 1, ch)
        self.out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, h: torch.Tensor | None = None
    ) -> torch.Tensor:
        c = nn.functional.silu(self.cond(t, y, h))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, c)
        return self.out(nn.functional.silu(self.norm(h)))


def build_student(cfg: StudentModelConfig) -> nn.Module:
    cfg.validate()
    return {"mlp": MLPVelocity, "dit": DiTVelocity, "conv": ConvVelocity}[cfg.arch](cfg)
