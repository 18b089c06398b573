"""Unit conversions the stages share."""

from __future__ import annotations

import math

import torch


def nll_to_bpd(nll_per_dim: torch.Tensor | float) -> torch.Tensor | float:
    """nats per dimension of x in [-1, 1] -> bits per dimension on the [0, 255] pixel scale."""
    return (nll_per_dim + math.log(127.5)) / math.log(2)
