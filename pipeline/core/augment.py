"""Data augmentation as exact pixel moves (random shifts and flips), drawn from the caller's random numbers so
that a training step or a cache row gets the same view wherever and however often it is computed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    shift: int = 2  # random translation by up to this many pixels (zero padding), per image
    flip: bool = True  # random horizontal flip


def augment(x: torch.Tensor, shift: torch.Tensor, flip: torch.Tensor, fill: float = -1.0) -> torch.Tensor:
    """Translate each image by shift[i] = (dy, dx) pixels, filling with `fill` (-1: the background of images
    in [-1, 1]; 0 for stored grey levels), and mirror it where flip[i]. Exact: whole pixels moved, no
    interpolation, any dtype."""
    n, _, h, w = x.shape
    s = int(shift.abs().max()) if shift.numel() else 0
    padded = F.pad(x, (s, s, s, s), value=fill)
    rows = (torch.arange(h, device=x.device)[None, :] + s - shift[:, 0:1]).clamp(0, h + 2 * s - 1)
    cols = (torch.arange(w, device=x.device)[None, :] + s - shift[:, 1:2]).clamp(0, w + 2 * s - 1)
    out = padded[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(x.shape[1], device=x.device)[
        None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]  # fmt: skip
    return torch.where(flip.view(n, 1, 1, 1), out.flip(-1), out)


def draw_augment(cfg: AugmentConfig, n: int, rand) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift (n, 2) int in [-shift, shift], flip (n,) bool) from `rand(3)`, uniform numbers on [0, 1) per row."""
    return augment_params(cfg, rand(3).reshape(n, 3))


def augment_params(cfg: AugmentConfig, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, flip) from uniform numbers u (n, 3): columns dy, dx, flip."""
    shift = (u[:, :2] * (2 * cfg.shift + 1)).floor().long() - cfg.shift
    flip = u[:, 2] < 0.5 if cfg.flip else torch.zeros(len(u), dtype=torch.bool, device=u.device)
    return shift, flip
