"""The one recipe for samples, shared by previews, `sample` commands and evaluation sweeps:

    eps ~ N(0, I) from a generator seeded by `seed` (on the CPU: the same on every device)
    z   = prior * eps                 the model's prior: the teacher's per-pixel std x temperature,
                                      the student path's prior scale (20 for ve), 1 otherwise;
        = prior.transform(eps, y)     or a Gaussian fitted per class to a pair cache's noise (core.prior)
    y   = label | labels like a reference set | 0, 1, ..., K-1, 0, 1, ... (column k of a grid = class k)
    x   = sampler(z, y)               the teacher's decode, the student's ODE solve
    grid: K columns when the labels cycle through the K classes

A stage passes its sampler; everything else is here, so the previews cannot drift from evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from nfm.core.errors import NFMError
from nfm.core.images import save_grid
from nfm.core.io import save_tensors
from nfm.core.prior import Prior, PriorBase

Sampler = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (z, y) on the device -> x


@dataclass(frozen=True)
class SampleInputs:
    """Fixed inputs of a sample batch: `eps` and `labels` on the CPU, `z` and `y` on the device."""

    eps: torch.Tensor  # (n, C, H, W) standard normal
    z: torch.Tensor  # prior * eps, on the device
    labels: torch.Tensor | None  # (n,) int64 or None (unconditional)
    y: torch.Tensor | None  # labels on the device
    cycled: bool  # labels are 0..K-1 repeated: a grid of K columns shows one class per column

    def __len__(self) -> int:
        return self.eps.shape[0]


def sample_labels(
    n: int, num_classes: int, label: int | None = None, like: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Labels for n samples: all `label`; or the class histogram of `like` (cycled); or 0..K-1 cycled."""
    if not num_classes:
        return None
    if label is not None:
        if not -1 <= label < num_classes:
            raise NFMError(f"label {label} is not a class of this model (0..{num_classes - 1}, or -1 for none)")
        return torch.full((n,), label, dtype=torch.long)
    if like is not None:
        return like[torch.arange(n) % len(like)].clamp(min=0)
    return torch.arange(n) % num_classes


def sample_inputs(
    n: int,
    image_shape: tuple[int, ...],
    num_classes: int,
    *,
    seed: int,
    prior: torch.Tensor | float | Prior = 1.0,
    label: int | None = None,
    labels_like: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> SampleInputs:
    """`labels`: each sample's label as given (-1: none), else `sample_labels(label, labels_like)`."""
    if n <= 0:
        raise NFMError(f"the number of samples must be positive, got {n}")
    eps = torch.randn(n, *image_shape, generator=torch.Generator().manual_seed(seed))
    y = labels.cpu().long() if labels is not None else sample_labels(n, num_classes, label, labels_like)
    z = prior.transform(eps, y) if isinstance(prior, PriorBase) else eps * prior
    return SampleInputs(
        eps=eps,
        z=z.to(device),
        labels=y,
        y=None if y is None else y.to(device),
        cycled=y is not None and label is None and labels_like is None and labels is None,
    )


def grid_columns(inputs: SampleInputs, num_classes: int) -> int | None:
    """One column per class when the labels cycle through the classes and fill whole rows."""
    return num_classes if inputs.cycled and len(inputs) % num_classes == 0 else None


def save_samples(
    x: torch.Tensor,
    inputs: SampleInputs,
    num_classes: int,
    path: str | Path,
    tensors: bool = False,
    metadata: dict[str, str] | None = None,
) -> Path:
    """PATH.png (the grid) and, with tensors=True, PATH.safetensors (images, noise, labels)."""
    base = Path(path).with_suffix("")
    if tensors:
        t = {"images": x.cpu(), "noise": inputs.eps, **({"labels": inputs.labels} if inputs.labels is not None else {})}
        save_tensors(base.with_suffix(".safetensors"), t, metadata=metadata)
    return save_grid(x, base.with_suffix(".png"), nrow=grid_columns(inputs, num_classes))


def sample_and_save(
    sampler: Sampler, inputs: SampleInputs, num_classes: int, path: str | Path, tensors: bool = False
) -> torch.Tensor:
    """The whole recipe for inputs made by `sample_inputs`: sampler, grid (and tensors). Returns the samples."""
    x = sampler(inputs.z, inputs.y)
    save_samples(x, inputs, num_classes, path, tensors=tensors)
    return x
