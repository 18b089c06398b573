"""The teacher's names that the `nfm` command lists without loading torch: TarFlow sizes and decoders."""

from __future__ import annotations

import typing
from typing import Literal

Decoder = Literal["sequential", "jacobi"]
DECODERS: tuple[str, ...] = typing.get_args(Decoder)

TARFLOW_SIZES: dict[str, dict] = {
    "tiny": dict(patch_size=2, width=32, num_blocks=2, layers_per_block=1, head_dim=16),  # tests
    "digits8": dict(patch_size=2, width=128, num_blocks=4, layers_per_block=2, head_dim=32),  # 8x8: 16 tokens
    "digits8-S": dict(patch_size=2, width=64, num_blocks=4, layers_per_block=2, head_dim=32),  # the CPU demo's
    "mnist28": dict(patch_size=4, width=128, num_blocks=4, layers_per_block=2, head_dim=32),  # 28x28: 49 tokens
    "mnist28-S": dict(patch_size=4, width=64, num_blocks=4, layers_per_block=2, head_dim=32),  # the CPU preset's
    "mnist28-large": dict(patch_size=4, width=256, num_blocks=4, layers_per_block=4, head_dim=64),  # GPU
    # GPU sizes for a user's own images: the published TarFlow configurations (patch 2-8, width 768-1024,
    # 8 blocks x 8 layers, head 64) scaled down
    "img32": dict(patch_size=2, width=384, num_blocks=8, layers_per_block=4, head_dim=64),  # 32x32: 256 patches
    "img64": dict(patch_size=4, width=512, num_blocks=8, layers_per_block=4, head_dim=64),  # 64x64: 256 patches
    # deep-shallow (STARFlow): one deep block next to the noise, three shallow ones, softplus scale
    "mnist28-ds": dict(
        patch_size=4, width=128, num_blocks=4, layers_per_block=(2, 2, 2, 6), head_dim=32, scale="softplus"
    ),
}
