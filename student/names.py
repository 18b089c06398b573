"""The student's names that the `nfm` command lists without loading torch: network sizes, couplings,
objectives, solvers and time grids."""

from __future__ import annotations

import typing
from typing import Literal

CouplingName = Literal["nfm", "independent", "minibatch-ot", "sd-ot", "sb", "reflow"]
PAIRED: tuple[str, ...] = ("nfm", "reflow")  # couplings read from a pair cache
COUPLINGS: tuple[str, ...] = typing.get_args(CouplingName)

# what a student learns: fm the instantaneous velocity; meanflow / shortcut the average velocity over a step
Objective = Literal["fm", "meanflow", "shortcut"]
OBJECTIVES: tuple[str, ...] = typing.get_args(Objective)
ONE_STEP: tuple[str, ...] = ("meanflow", "shortcut")  # interval students, sampled with solver=mean

Solver = Literal["euler", "midpoint", "heun", "rk4", "dopri5", "mean"]  # mean: steps of an average velocity
Grid = Literal["uniform", "data-end"]
SOLVERS = {
    "euler": "euler",
    "midpoint": "midpoint",
    "heun": "heun2",
    "rk4": "rk4",
    "dopri5": "dopri5",
    "mean": "mean",  # not torchdiffeq's: student/sampling.py steps an interval student's average velocity
}  # -> torchdiffeq
EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "mean": 1}


def fixed_nfe(solver: str, steps: int) -> int:
    """Velocity evaluations of `steps` steps of a fixed-step solver: heun's last step is Euler (as in EDM's
    sampler: its correction would evaluate the velocity at t = 1), so it takes 2 steps - 1."""
    return 2 * steps - 1 if solver == "heun" else EVALS_PER_STEP[solver] * steps


GRIDS: tuple[str, ...] = typing.get_args(Grid)

# Named sizes (DiT-style); data-dependent fields come from the data.
STUDENT_SIZES: dict[str, dict] = {
    "mlp-tiny": dict(arch="mlp", width=64, depth=2),
    "mlp-S": dict(arch="mlp", width=512, depth=3),
    "conv-S": dict(arch="conv", width=64, depth=4),  # small images: residual blocks at full resolution
    "SiT-tiny": dict(arch="dit", patch_size=2, width=32, depth=2, heads=2),
    "SiT-S/2": dict(arch="dit", patch_size=2, width=128, depth=6, heads=4),  # 8x8: 16 tokens
    "SiT-XS/4": dict(arch="dit", patch_size=4, width=96, depth=4, heads=4),  # 28x28 on a CPU: 49 tokens
    "SiT-S/4": dict(arch="dit", patch_size=4, width=192, depth=8, heads=6),  # 28x28: 49 tokens
    "SiT-B/2": dict(arch="dit", patch_size=2, width=384, depth=12, heads=6),  # 32x32: 256 tokens (GPU)
    "SiT-B/4": dict(arch="dit", patch_size=4, width=384, depth=12, heads=6),  # 64x64: 256 tokens (GPU)
}
