"""accelerate's process state, the same way for the training loop and the pair build."""

from __future__ import annotations

import os

import torch


def force_cpu() -> bool:
    """Run on the CPU when asked (NFM_CPU=1) or when several processes run without a GPU, in which
    case accelerate needs cpu=True to join them with gloo (torchrun / accelerate launch on CPU)."""
    if os.environ.get("NFM_CPU", "") not in ("", "0"):
        return True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > 1 and not torch.cuda.is_available()


def process_state():
    """accelerate's process state (rank, world size, device), initialised consistently with the loop."""
    from accelerate import PartialState

    return PartialState(cpu=force_cpu())


def default_device(name: str | None = None) -> torch.device:
    """`name` if given, else cuda when available, else cpu."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
