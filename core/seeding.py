"""Randomness as a pure function of (seed, step, row): resumed and multi-process runs repeat themselves."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any, TypeVar

import torch

T = TypeVar("T")

SEED_STRIDE = 1000  # training seed k of a multi-seed run adds SEED_STRIDE * k to each of its training seeds


def seeded_config(cfg: T, k: int, fields: tuple[str, ...]) -> T:
    """The config of training seed k of a multi-seed run: each dotted field (`teacher.train.seed`, ...) +
    SEED_STRIDE * k; k = 0 is cfg itself. Only the training seeds named move: an evaluation's noise seed stays,
    so every training seed is scored on the same noise."""
    if k == 0:
        return cfg

    def shifted(obj: Any, path: list[str]) -> Any:
        head, *rest = path
        value = getattr(obj, head)
        return replace(obj, **{head: shifted(value, rest) if rest else value + SEED_STRIDE * k})

    for f in fields:
        cfg = shifted(cfg, f.split("."))
    return cfg


def derive_seed(*parts: Any) -> int:
    """A well-mixed 63-bit seed from any tuple, e.g. (seed, rank, step)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class BatchRandom:
    """Random numbers for rows [offset, offset + n) of one step's global batch of `total` rows.

    Each draw generates the values of the whole global batch from a generator seeded by
    (seed, step, draw index) and keeps this slice, so a row's noise does not depend on how
    the batch is split over processes and accumulation rounds. Draws must happen in the same
    order on every process (they do: every process runs the same loss code).
    """

    def __init__(self, seed: int, step: int, offset: int, n: int, total: int, device: torch.device | str = "cpu"):
        self.seed, self.step, self.offset, self.n, self.total = seed, step, offset, n, total
        self.device = torch.device(device)
        self._draws = 0

    def _generator(self) -> torch.Generator:
        self._draws += 1
        return torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, self.step, self._draws))

    def randn(self, *row_shape: int) -> torch.Tensor:
        """Standard normal, shape (n, *row_shape)."""
        full = torch.randn(self.total, *row_shape, generator=self._generator(), device=self.device)
        return full[self.offset : self.offset + self.n]

    def rand(self, *row_shape: int) -> torch.Tensor:
        """Uniform on [0, 1), shape (n, *row_shape)."""
        full = torch.rand(self.total, *row_shape, generator=self._generator(), device=self.device)
        return full[self.offset : self.offset + self.n]
