import os

# Tests never touch the network: the hub is off, so an unknown dataset name fails at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from nfm.teacher.model import TARFLOW_SIZES, TarFlow, TarFlowConfig  # noqa: E402


def make_flow(
    channels=1, img_size=8, patch_size=2, num_classes=0, dtype=torch.float64, seed=0, randomize=True, **kw
) -> TarFlow:
    """A tiny TarFlow with non-trivial weights (the output projections are random, not zero)."""
    torch.manual_seed(seed)
    size = {**TARFLOW_SIZES["tiny"], "patch_size": patch_size, **kw}
    cfg = TarFlowConfig(in_channels=channels, img_size=img_size, num_classes=num_classes, noise_std=0.1, **size)
    model = TarFlow(cfg).to(dtype)
    if randomize:
        with torch.no_grad():
            for block in model.blocks:
                block.proj_out.weight.normal_(0, 0.02)
                block.proj_out.bias.normal_(0, 0.02)
    return model.eval()


@pytest.fixture
def flow_factory():
    return make_flow


def make_teacher_export(path, seed=0, noise_std=0.1, width=32, blocks=2, data=None):
    """A small random (non-trivial) class-conditional digits teacher, saved as an export."""
    from nfm.pipeline.core.data import DataConfig
    from nfm.teacher.export import save_export

    data = data or DataConfig(name="digits", held_out=0.9)
    torch.manual_seed(seed)
    cfg = TarFlowConfig(
        in_channels=1,
        img_size=8,
        patch_size=2,
        width=width,
        num_blocks=blocks,
        layers_per_block=1,
        head_dim=16,
        num_classes=10,
        noise_std=noise_std,
    )
    model = TarFlow(cfg)
    with torch.no_grad():
        for b in model.blocks:
            b.proj_out.weight.normal_(0, 0.02)
            b.proj_out.bias.normal_(0, 0.02)
    save_export(model, path, step=0, extra={"data": data.__dict__})
    return path


USER_FLOW = textwrap.dedent(
    '''
    import hashlib
    import torch

    class ElementwiseFlow:
        """z = (x - mu_y) / s: a per-pixel affine flow with a class-dependent shift."""

        def __init__(self, scale=0.5, num_classes=10):
            g = torch.Generator().manual_seed(0)
            self.image_shape = (1, 8, 8)
            self.num_classes = num_classes
            self.noise_std = 0.1
            self.s = scale + 0.1 * torch.rand(1, 8, 8, generator=g)
            self.mu = 0.3 * torch.randn(num_classes, 1, 8, 8, generator=g)

        def _shift(self, y, n):
            return self.mu[y.clamp(min=0)] if y is not None else torch.zeros(n, 1, 8, 8)

        def encode(self, x, y):
            return (x - self._shift(y, len(x))) / self.s

        def decode(self, z, y):
            return z * self.s + self._shift(y, len(z))

        def fingerprint(self):
            return hashlib.sha256(self.s.numpy().tobytes() + self.mu.numpy().tobytes()).hexdigest()[:16]

    def make(scale=0.5):
        return ElementwiseFlow(scale=float(scale))

    def broken():
        return object()
    '''
)


@pytest.fixture
def user_flow_dir(tmp_path):
    """A directory holding userflow.py: a user's own (non-TarFlow) flow for python:userflow:make."""
    d = tmp_path / "userflow_pkg"
    d.mkdir()
    (d / "userflow.py").write_text(USER_FLOW)
    return d
