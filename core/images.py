"""Sample grids as PNG through torchvision: images in [-1, 1], small tiles nearest-upscaled so they stay visible."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from nfm.core.io import atomic_write


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> [0, 255] uint8 (values outside are clipped)."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid_image(x: torch.Tensor, nrow: int | None = None, pad: int = 2, min_tile: int = 48) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> one (3, H', W') float image in [0, 1]: `nrow` tiles per row (default about
    sqrt(N)), each nearest-upscaled to >= min_tile px, white gutters of `pad` px."""
    n, _, h, w = x.shape
    scale = max(1, math.ceil(min_tile / max(h, w)))
    u = to_uint8(x).float() / 255.0  # quantised as the PNG stores it
    if scale > 1:
        u = F.interpolate(u, scale_factor=scale, mode="nearest")
    return make_grid(u, nrow=nrow or max(1, math.ceil(math.sqrt(n))), padding=pad, pad_value=1.0)


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write the grid of `x` as a PNG (atomically)."""
    grid = grid_image(x, nrow)
    return atomic_write(path, lambda p: save_image(grid, p, format="PNG"))
