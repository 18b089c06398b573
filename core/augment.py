"""Data augmentation as exact pixel moves (random shifts and flips), drawn from the caller's random numbers so
that a training step or a cache row gets the same view wherever and however often it is computed."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nfm.core.seeding import derive_seed


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


@functools.lru_cache(maxsize=8)
def _view_table(seed: int, view: int, n_rows: int) -> torch.Tensor:
    """Uniform numbers (dy, dx, flip) for every row of view `view`: drawn once per data set, not per batch."""
    g = torch.Generator().manual_seed(derive_seed(seed, "kt-view", view))
    return torch.rand(n_rows, 3, generator=g)


def view_params(cfg: AugmentConfig, seed: int, rows: torch.Tensor, views: torch.Tensor, n_rows: int):
    """(shift, flip) of the given (row, view) pairs: drawn per view over every row of the data set from a
    generator seeded by (seed, view), so a row's view does not depend on the batch it is drawn in. View 0 is
    the image as it is."""
    shift = torch.zeros(len(rows), 2, dtype=torch.long)
    flip = torch.zeros(len(rows), dtype=torch.bool)
    for v in views.unique().tolist():
        if v == 0:
            continue
        s, f = augment_params(cfg, _view_table(seed, v, n_rows))
        sel = views == v
        shift[sel], flip[sel] = s[rows[sel]], f[rows[sel]]
    return shift, flip


def draw_views(data, ids: torch.Tensor, views_per_image: int, cfg: AugmentConfig, seed: int) -> dict[str, torch.Tensor]:
    """Rows `ids` of a data set seen `views_per_image` times (row id = image * views_per_image + view): the views
    as stored grey levels, their labels, images and view numbers."""
    rows, views = ids // views_per_image, ids % views_per_image
    u, y = data.raw(rows.tolist())
    shift, flip = view_params(cfg, seed, rows, views, len(data))
    return {"data": augment(u, shift, flip, fill=0), "label": y, "index": rows, "view": views}
