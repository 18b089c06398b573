"""One-step students (student/meanflow.py, student/shortcut.py): the MeanFlow target and the shortcut's
self-consistency target, exactly; interval networks beside old ones; both objectives trained and sampled."""

import json
import re

import pytest
import torch

from nfm.core.errors import NFMError
from nfm.student.meanflow import StepRows, adaptive_loss, average_velocity_target, pair_steps, sample_mean
from nfm.student.models import StudentModelConfig, build_student
from nfm.student.shortcut import consistency_steps, consistency_target, grid_time, shortcut_loss


def _student(interval: bool, arch: str = "mlp", seed: int = 0, randomize: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = StudentModelConfig(arch=arch, width=32, depth=2, num_classes=3, interval=interval).resolved(1, 4, 3)
    model = build_student(cfg).double()
    if randomize:  # the step embedding starts at zero; a trained one does not
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("arch", ["mlp", "dit"])  # dit: attention has a forward-mode derivative (its math kernel)
def test_the_jvp_target_is_v_plus_h_times_the_derivative_along_the_flow_float64(arch):
    model = _student(True, arch)
    g = torch.Generator().manual_seed(1)
    x, v = (
        torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64),
        torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64),
    )
    t, h = torch.rand(5, generator=g, dtype=torch.float64) * 0.5, torch.rand(5, generator=g, dtype=torch.float64) * 0.5
    y = torch.tensor([0, 1, 2, -1, 1])
    u, target = average_velocity_target(model, x, t, h, v, y)
    # the same output (dit: to rounding, the JVP runs attention through another kernel)
    torch.testing.assert_close(u, model(x, t, y, h=h), atol=1e-13, rtol=0)
    assert not target.requires_grad
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
    assert float(adaptive_loss(u, target, power=0.0).detach()) == pytest.approx(plain, rel=1e-12)


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


class ExactLinear(torch.nn.Module):
    """The exact average velocity of the linear field dx/dt = B x: the flow map of a step h is exp(B h), so
    s(x, t, h) = (exp(B h) - I) x / h, and B x at h = 0."""

    def __init__(self, B: torch.Tensor):
        super().__init__()
        self.B = B

    def forward(self, x, t, y=None, h=None):
        flat = x.flatten(1)
        eye = torch.eye(self.B.shape[0], dtype=x.dtype)
        step = torch.stack([(torch.linalg.matrix_exp(self.B * hh) - eye) / hh if hh > 0 else self.B for hh in h])
        return (step @ flat[:, :, None]).view_as(x)


def test_the_shortcut_target_is_exact_for_a_linear_field_float64():
    """Two steps of d of the exact average velocity are one step of 2d: the self-consistency target equals
    s(x, t, 2d) to rounding, for every d; with h = 0 for the half steps it is two Euler steps."""
    B = torch.tensor([[-0.7, 1.3], [-0.4, 0.2]], dtype=torch.float64)
    exact, x = ExactLinear(B), torch.randn(5, 1, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 0.25, 0.5, 0.0, 0.75], dtype=torch.float64)
    d = torch.tensor([0.5, 0.25, 0.125, 2.0**-7, 0.125], dtype=torch.float64)
    target = consistency_target(exact, x, t, d, None, d)
    # to rounding: (exp(B h) - I) / h loses log2(1/h) bits as h falls (5e-12 at h = 2^-7)
    torch.testing.assert_close(target, exact(x, t, None, h=2 * d), atol=1e-10, rtol=0)
    assert float((target - exact(x, t, None, h=2 * d))[:3].abs().max()) < 1e-13
    euler = consistency_target(exact, x, t, d, None, torch.zeros_like(d))
    x1 = x + d.view(-1, 1, 1, 1) * exact(x, t, None, h=torch.zeros_like(d))
    two_euler = 0.5 * (exact(x, t, None, h=torch.zeros_like(d)) + exact(x1, t, None, h=torch.zeros_like(d)))
    torch.testing.assert_close(euler, two_euler, atol=1e-15, rtol=0)


def test_shortcut_steps_are_powers_of_two_from_grid_points_and_the_rest_is_flow_matching():
    u_share, u_level, u_place = torch.rand(3, 40_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    consistent, step = consistency_steps(u_share, u_level, u_place, 0.25, 7)
    assert torch.equal(consistent, u_share < 0.25)
    levels = -torch.log2(step)
    assert torch.equal(levels, levels.round()) and set(levels.int().tolist()) == set(range(7))
    t = grid_time(step, u_place)
    assert (t >= 0).all() and (t + step <= 1).all() and torch.equal(t / step, (t / step).round())
    assert len(set(t[step == 2.0**-6].tolist())) == 64  # every grid point of the finest level is drawn
    for share, levels_ in ((1.5, 7), (0.25, 0)):
        with pytest.raises(NFMError, match="must be"):
            consistency_steps(u_share, u_level, u_place, share, levels_)


def test_without_self_consistency_rows_the_shortcut_loss_is_the_flow_matching_loss():
    model = _student(True)
    x, v = torch.randn(4, 1, 4, 4, dtype=torch.float64), torch.randn(4, 1, 4, 4, dtype=torch.float64)
    t, zero, y = torch.rand(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), torch.tensor([0, 1, 2, -1])
    loss = shortcut_loss(model, StepRows(x, t, zero, v, y), torch.zeros(4, dtype=torch.bool), 2.0**-7)
    fm = (model(x, t, y, h=zero) - v).pow(2).mean()
    assert float(loss.detach()) == pytest.approx(float(fm.detach()), rel=1e-12)
    # a self-consistency row's target is the two half steps (the finest: with the instantaneous velocity)
    h, rows = torch.tensor([0.5, 0.0, 2.0**-6, 0.0], dtype=torch.float64), torch.tensor([True, False, True, False])
    with torch.no_grad():
        target = v.clone()
        target[0] = consistency_target(model, x[:1], t[:1], h[:1] / 2, y[:1], h[:1] / 2)[0]
        target[2] = consistency_target(model, x[2:3], t[2:3], h[2:3] / 2, y[2:3], zero[:1])[0]
    expected = (model(x, t, y, h=h) - target).pow(2).mean().detach()
    assert float(shortcut_loss(model, StepRows(x, t, h, v, y), rows, 2.0**-7).detach()) == pytest.approx(
        float(expected), rel=1e-12
    )


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


def test_one_step_students_map_noise_to_either_mode_in_one_step_where_flow_matching_lands_between():
    """Independent pairs of z ~ N(0, 1) and x = +-2: the paths cross, so one Euler step of a flow-matching
    student lands near the mean (0); one step of a MeanFlow or a shortcut student follows the flow's map,
    z < 0 -> -2 and z > 0 -> +2 (the monotone transport), as the papers' one-step samples do."""
    from nfm.student.meanflow import meanflow_loss, pair_steps

    def student(interval: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        cfg = StudentModelConfig(arch="mlp", width=64, depth=3, num_classes=0, interval=interval).resolved(1, 1, 0)
        return build_student(cfg)

    g = torch.Generator().manual_seed(0)
    models = {"fm": student(False), "meanflow": student(True), "shortcut": student(True)}
    for name, model in models.items():
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(300):
            z = torch.randn(256, 1, 1, 1, generator=g)
            x = torch.where(torch.rand(256, 1, 1, 1, generator=g) < 0.5, -2.0, 2.0)
            t, h = torch.rand(256, generator=g), torch.zeros(256)
            if name == "meanflow":
                t, h = pair_steps(t, torch.rand(256, generator=g), torch.rand(256, generator=g), 0.5)
            elif name == "shortcut":
                u = torch.rand(3, 256, generator=g)
                rows, step = consistency_steps(*u, 0.5, 3)
                t, h = torch.where(rows, grid_time(step, u[2]), t), torch.where(rows, step, h)
            xt = (1 - t.view(-1, 1, 1, 1)) * z + t.view(-1, 1, 1, 1) * x
            if name == "meanflow":
                loss = meanflow_loss(model, StepRows(xt, t, h, x - z, None))
            elif name == "shortcut":
                loss = shortcut_loss(model, StepRows(xt, t, h, x - z, None), rows, 2.0**-3)
            else:
                loss = (model(xt, t) - (x - z)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    z = torch.linspace(-2.5, 2.5, 201).view(-1, 1, 1, 1)
    away = z.abs().flatten() > 0.5  # away from the boundary the map is settled
    with torch.no_grad():
        fm_one = z + models["fm"](z, torch.zeros(201))
    assert float(fm_one.abs().flatten()[away].mean()) < 1.0  # between the modes
    for name in ("meanflow", "shortcut"):
        one, _ = sample_mean(models[name], z, None, 1)
        assert float((one.flatten()[away] - 2 * z.flatten()[away].sign()).abs().mean()) < 0.5, name  # on them


@pytest.mark.parametrize("objective", ["meanflow", "shortcut"])
def test_a_one_step_objective_trains_through_the_usual_loop_and_samples_with_its_own_solver(tmp_path, objective):
    """`flow.objective=meanflow|shortcut` (`--objective`) trains an interval student (the step input set for
    it) through the usual loop; `solver=mean` samples it at NFE = steps, and `nfm student sample` picks that
    solver by itself; a plain student is refused that solver, a VP path that objective."""
    from nfm.core.config import build_config
    from nfm.pipeline.presets import STUDENT_PRESETS
    from nfm.student.sampling import sample_ode
    from nfm.student.train import StudentRunConfig, load_student, run_student_training

    from .conftest import run_nfm_inline

    printed = run_nfm_inline("student", "train", "--preset", "tiny", "--objective", objective, "--print-config")
    assert printed.returncode == 0 and re.search(rf"flow.objective +'{objective}'", printed.stdout), printed.stdout
    over = ["flow.coupling=independent", f"flow.objective={objective}", "train.steps=4", "train.batch_size=16",
            "train.sample_every=0", "model.arch=mlp"]  # fmt: skip
    cfg = build_config(StudentRunConfig, preset=STUDENT_PRESETS["tiny"], overrides=over)
    export = run_student_training(cfg, tmp_path / "s")
    model, meta = load_student(export)
    assert meta["model"]["interval"] is True and meta["flow"]["objective"] == objective
    recorded = json.loads((tmp_path / "s" / "config.json").read_text())
    assert recorded["sample"]["solver"] == "mean"  # the preview steps the average velocity
    z, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    x, stats = sample_ode(model, z, y, solver="mean", steps=2)
    assert stats["nfe"] == 2 and x.shape == z.shape and torch.isfinite(x).all()
    torch.testing.assert_close(x, sample_mean(model, z, y, 2)[0])  # the sampler's loop is sample_mean's
    sampled = run_nfm_inline("student", "sample", export, "--n", 4, "--steps", 2, "--out", tmp_path / "grid")
    assert sampled.returncode == 0 and "solver mean, NFE 2" in sampled.stdout, sampled.stderr
    plain = build_student(StudentModelConfig(arch="mlp", width=8, depth=1, num_classes=0).resolved(1, 8, 0))
    with pytest.raises(NFMError, match="solver=mean steps an average velocity: this student has none"):
        sample_ode(plain, z, None, solver="mean", steps=1)
    vp = build_config(StudentRunConfig, preset=STUDENT_PRESETS["tiny"], overrides=[*over, "flow.path=vp"])
    with pytest.raises(NFMError, match=f"objective={objective} needs flow.path=linear"):
        run_student_training(vp, tmp_path / "vp")
