"""Sample grids as PNG: images in [-1, 1] tiled, nearest-upscaled so small images stay visible."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from pipeline.io import atomic_write


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> [0, 255] uint8 (values outside are clipped)."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 1, min_tile: int = 48) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> an (rows*H', cols*W', 3) uint8 grid; tiles upscaled to >= min_tile px."""
    n, c, h, w = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    u = to_uint8(x)
    if c == 1:
        u = u.expand(-1, 3, -1, -1)
    scale = max(1, math.ceil(min_tile / max(h, w)))
    u = u.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    u = torch.nn.functional.pad(u, (pad, pad, pad, pad), value=255)  # white gutters
    blank = torch.full((rows * nrow - n, *u.shape[1:]), 255, dtype=torch.uint8)
    u = torch.cat([u, blank])
    grid = rearrange(u, "(r k) c h w -> (r h) (k w) c", r=rows, k=nrow)
    return grid.numpy()


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    grid = Image.fromarray(make_grid(x, nrow))
    return atomic_write(path, lambda p: grid.save(p, format="PNG"))
