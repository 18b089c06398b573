"""One-step students (student/meanflow.py): the MeanFlow target, exactly; interval networks beside old ones."""

import pytest
import torch

from nfm.core.errors import NFMError
from nfm.student.meanflow import adaptive_loss, average_velocity_target, pair_steps, sample_mean
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
    t, s, u = torch.rand(3, 20_000, generator=torch.Generator().manual_seed(0))
    tt, h = pair_steps(t, s, u, 0.75)
    assert (h >= 0).all() and (tt + h <= 1).all() and torch.equal(h == 0, u < 0.75)
    assert torch.equal(tt[u >= 0.75], torch.minimum(t, s)[u >= 0.75]) and torch.equal(tt[u < 0.75], t[u < 0.75])
    with pytest.raises(NFMError, match="must be in"):
        pair_steps(t, s, u, 1.5)


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


def test_a_meanflow_student_maps_noise_to_either_mode_in_one_step_where_flow_matching_lands_between():
    """Independent pairs of z ~ N(0, 1) and x = +-2: the paths cross, so one Euler step of a flow-matching
    student lands near the mean (0); one step of a MeanFlow student follows the flow's map, z < 0 -> -2 and
    z > 0 -> +2 (the monotone transport), as the paper's one-step samples do."""
    from nfm.student.meanflow import meanflow_loss, pair_steps

    def student(interval: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        cfg = StudentModelConfig(arch="mlp", width=64, depth=3, num_classes=0, interval=interval).resolved(1, 1, 0)
        return build_student(cfg)

    g = torch.Generator().manual_seed(0)
    models = {"fm": student(False), "meanflow": student(True)}
    for name, model in models.items():
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(600):
            z = torch.randn(256, 1, 1, 1, generator=g)
            x = torch.where(torch.rand(256, 1, 1, 1, generator=g) < 0.5, -2.0, 2.0)
            t = torch.rand(256, generator=g)
            if name == "meanflow":
                t, h = pair_steps(t, torch.rand(256, generator=g), torch.rand(256, generator=g), 0.5)
                xt = (1 - t.view(-1, 1, 1, 1)) * z + t.view(-1, 1, 1, 1) * x
                loss = meanflow_loss(model, xt, t, h, x - z, None)
            else:
                xt = (1 - t.view(-1, 1, 1, 1)) * z + t.view(-1, 1, 1, 1) * x
                loss = (model(xt, t) - (x - z)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    z = torch.linspace(-2.5, 2.5, 201).view(-1, 1, 1, 1)
    away = z.abs().flatten() > 0.5  # away from the boundary the map is settled
    with torch.no_grad():
        fm_one = z + models["fm"](z, torch.zeros(201))
    mf_one, _ = sample_mean(models["meanflow"], z, None, 1)
    assert float(fm_one.abs().flatten()[away].mean()) < 1.0  # between the modes
    assert float((mf_one.flatten()[away] - 2 * z.flatten()[away].sign()).abs().mean()) < 0.5  # on them


def test_nfm_student_train_with_the_meanflow_objective_and_its_one_step_sampler(tmp_path):
    """`flow.objective=meanflow` trains an interval student (the step input set for it) through the usual loop;
    `solver=mean` samples it at NFE = steps; a plain student is refused that solver, a VP path that objective."""
    from nfm.core.config import build_config
    from nfm.pipeline.presets import STUDENT_PRESETS
    from nfm.student.sampling import sample_ode
    from nfm.student.train import StudentRunConfig, load_student, run_student_training

    over = ["flow.coupling=independent", "flow.objective=meanflow", "train.steps=4", "train.batch_size=16",
            "train.sample_every=0", "model.arch=mlp"]  # fmt: skip
    cfg = build_config(StudentRunConfig, preset=STUDENT_PRESETS["tiny"], overrides=over)
    model, meta = load_student(run_student_training(cfg, tmp_path / "s"))
    assert meta["model"]["interval"] is True and meta["flow"]["objective"] == "meanflow"
    z, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    x, stats = sample_ode(model, z, y, solver="mean", steps=2)
    assert stats["nfe"] == 2 and x.shape == z.shape and torch.isfinite(x).all()
    plain = build_student(StudentModelConfig(arch="mlp", width=8, depth=1, num_classes=0).resolved(1, 8, 0))
    with pytest.raises(NFMError, match="solver=mean steps an average velocity: this student has none"):
        sample_ode(plain, z, None, solver="mean", steps=1)
    vp = build_config(StudentRunConfig, preset=STUDENT_PRESETS["tiny"], overrides=[*over, "flow.path=vp"])
    with pytest.raises(NFMError, match="objective=meanflow needs flow.path=linear"):
        run_student_training(vp, tmp_path / "vp")
