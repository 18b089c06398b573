"""One-step students (student/meanflow.py): the MeanFlow target, exactly; interval networks beside old ones."""

import pytest
import torch

from nfm.core.errors import NFMError
from nfm.student.meanflow import adaptive_loss, average_velocity_target, sample_mean, sample_steps
from nfm.student.models import StudentModelConfig, build_student


def _student(interval: bool, arch: str = "mlp", seed: int = 0, randomize: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = StudentModelConfig(arch=arch, width=32, depth=2, num_classes=3, interval=interval).resolved(1, 4, 3)
    model = build_student(cfg).double()
    if randomize:  # the step embedding starts at zero; a trained one does not
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


def test_the_jvp_target_is_v_plus_h_times_the_derivative_along_the_flow_float64():
    model = _student(True)
    g = torch.Generator().manual_seed(1)
    x, v = (
        torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64),
        torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64),
    )
    t, h = torch.rand(5, generator=g, dtype=torch.float64) * 0.5, torch.rand(5, generator=g, dtype=torch.float64) * 0.5
    y = torch.tensor([0, 1, 2, -1, 1])
    u, target = average_velocity_target(model, x, t, h, v, y)
    assert torch.equal(u, model(x, t, y, h=h)) and not target.requires_grad
    # central difference along (x, t, h) -> (x + e v, t + e, h - e), the step's end held fixed; its error falls as
    # e^2 (3e-4 at e = 1e-5, 3e-8 at 1e-7 on values up to 25: the time embedding's frequencies reach 1000)
    eps = 1e-7
    fd = (model(x + eps * v, t + eps, y, h=h - eps) - model(x - eps * v, t - eps, y, h=h + eps)) / (2 * eps)
    torch.testing.assert_close(target, v + h.view(-1, 1, 1, 1) * fd, atol=1e-6, rtol=1e-7)


def test_at_h_zero_the_target_is_v_and_the_loss_is_flow_matching():
    model = _student(True)
    x, v, t = torch.randn(4, 1, 4, 4, dtype=torch.float64), torch.randn(4, 1, 4, 4, dtype=torch.float64), torch.rand(4)
    u, target = average_velocity_target(model, x, t.double(), torch.zeros(4, dtype=torch.float64), v, None)
    assert torch.equal(target, v)
    plain = float((u - v).detach().pow(2).flatten(1).sum(1).mean())
    assert float(adaptive_loss(u, target, power=0.0)) == pytest.approx(plain, rel=1e-12)


def test_an_exact_average_velocity_steps_to_the_flow_s_end_in_one_step():
    """A linear flow x_t = (1 - t) z + t A z: its velocity is A z - z whatever t; the average velocity of a step
    is the same, so one step of it reaches A z exactly (the one-step map the students learn)."""
    A = torch.tensor([[2.0, 0.5], [0.0, -1.0]], dtype=torch.float64)

    class Exact(torch.nn.Module):
        def forward(self, x, t, y=None, h=None):  # x_t -> z = x_t / ((1 - t) + t A), then A z - z
            m = (1 - t)[:, None, None] * torch.eye(2, dtype=x.dtype) + t[:, None, None] * A
            z = torch.linalg.solve(m, x.flatten(1)[:, :, None])
            return ((A - torch.eye(2, dtype=x.dtype)) @ z).view_as(x)

    z = torch.randn(6, 1, 1, 2, dtype=torch.float64)
    for steps in (1, 3):
        x, stats = sample_mean(Exact(), z, None, steps)
        torch.testing.assert_close(x.flatten(1), z.flatten(1) @ A.T, atol=1e-12, rtol=0)
        assert stats["nfe"] == steps
    u, target = average_velocity_target(Exact(), z, torch.full((6,), 0.2, dtype=torch.float64),
                                        torch.full((6,), 0.5, dtype=torch.float64), Exact()(z, torch.full((6,), 0.2,
                                        dtype=torch.float64)), None)  # fmt: skip
    torch.testing.assert_close(u, target, atol=1e-12, rtol=0)  # the identity holds for the exact field


def test_step_pairs_keep_a_share_at_h_zero_and_stay_inside_the_unit_interval():
    t = torch.rand(20_000, generator=torch.Generator().manual_seed(0))
    tt, h = sample_steps(t, 0.75, torch.Generator().manual_seed(1))
    assert (h >= 0).all() and (tt + h <= 1).all() and abs(float((h == 0).float().mean()) - 0.75) < 0.02
    with pytest.raises(NFMError, match="must be in"):
        sample_steps(t, 1.5)


@pytest.mark.parametrize("arch", ["mlp", "conv", "dit"])
def test_a_student_without_the_step_input_is_the_network_of_before(arch):
    """Old exports have no step embedding: the same parameters as before; an interval student starts as the
    same network (its step embedding is zero) whatever h; asking a plain one for h is one line."""
    plain, interval = _student(False, arch, randomize=False), _student(True, arch, randomize=False)
    assert not any(k.startswith("cond.step") for k in plain.state_dict())
    extra = {k for k in interval.state_dict()} - set(plain.state_dict())
    assert extra and all(k.startswith("cond.step") for k in extra)
    interval.load_state_dict({**interval.state_dict(), **plain.state_dict()})
    x, t = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    torch.testing.assert_close(interval(x, t, None, h=torch.full((2,), 0.3, dtype=torch.float64)), plain(x, t))
    with pytest.raises(NFMError, match="has no step-length input"):
        plain(x, t, None, h=t)
