"""Stage three: paths, the loss, samplers, couplings, the velocity networks, training and its CLI."""

import itertools
import json
import math
import os
import signal
from dataclasses import asdict, replace

import pytest
import torch

from nfm.core.checkpoint import list_checkpoints
from nfm.core.config import build_config
from nfm.core.data import DataConfig, load_data
from nfm.core.errors import NFMError
from nfm.core.io import load_tensors, read_json
from nfm.core.loop import Interrupted
from nfm.core.seeding import BatchRandom
from nfm.pairs.build import PairBuildConfig, build_pairs
from nfm.pairs.reader import PairCache
from nfm.pipeline.presets import STUDENT_PRESETS
from nfm.student.couplings import IndependentCoupling, MinibatchOTCoupling, PairCoupling, ot_permutation
from nfm.student.models import StudentModelConfig, build_student
from nfm.student.paths import PATHS, ProbPath
from nfm.student.sampling import EVALS_PER_STEP, sample_ode, time_grid
from nfm.student.train import FlowConfig, StudentRunConfig, flow_matching_loss, load_student, run_student_training
from nfm.teacher.export import load_teacher
from tests.conftest import make_teacher_export, run_nfm

DATA = DataConfig(name="digits", held_out=0.9)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    export = make_teacher_export(root / "teacher", data=DATA)
    return build_pairs(
        load_teacher(export), load_data(DATA), PairBuildConfig(views=2, shard_rows=50), root / "c", log=lambda *a: None
    ).path


# ----------------------------------------------------------------------------- paths and the loss


@pytest.mark.parametrize("kind", PATHS)
def test_path_velocity_is_the_time_derivative(kind):
    path = ProbPath(kind)
    z, x = torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(5, 2, 3, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64).requires_grad_(True)
    xt, u = path.sample(z, x, t)
    for i in range(5):
        (dt,) = torch.autograd.grad(xt[i].sum(), t, retain_graph=True)
        # d/dt of the sum over the row's entries = sum of u over the row
        assert dt[i].item() == pytest.approx(u[i].sum().item(), abs=1e-10)
    ends = path.sample(z, x, torch.tensor([0.0, 1.0], dtype=torch.float64).repeat(3)[:5])[0]
    if kind != "ve":
        torch.testing.assert_close(ends[0], z[0], atol=1e-12, rtol=0)  # t = 0 is noise
        torch.testing.assert_close(ends[1], x[1], atol=1e-12, rtol=0)  # t = 1 is data
    assert path.prior_scale == (20.0 if kind == "ve" else 1.0)


class _Oracle(torch.nn.Module):
    """Returns the true conditional velocity of the batch it was built for."""

    def __init__(self, path, z, x):
        super().__init__()
        self.path, self.z, self.x = path, z, x

    def forward(self, xt, t, y):
        xt_true, u = self.path.sample(self.z, self.x, t)
        assert torch.equal(xt, xt_true)
        return u


class _FixedCoupling:
    def __init__(self, z):
        self.z = z

    def couple(self, batch, rng):
        x, y = batch
        return self.z, x, y


@pytest.mark.parametrize("kind", PATHS)
@pytest.mark.parametrize("time", ["uniform", "logit-normal"])
def test_flow_matching_loss_is_exactly_zero_for_the_true_velocity(kind, time):
    torch.set_default_dtype(torch.float64)
    try:
        z, x, y = torch.randn(8, 1, 4, 4), torch.randn(8, 1, 4, 4), torch.arange(8)
        path = ProbPath(kind)
        flow = FlowConfig(path=kind, time=time)
        loss_fn = flow_matching_loss(_FixedCoupling(z), path, flow, class_dropout=0.5)
        loss, _ = loss_fn(_Oracle(path, z, x), (x, y), BatchRandom(0, 0, 0, 8, 8))
        assert loss.item() == 0.0
        wrong, _ = loss_fn(lambda xt, t, y: torch.zeros_like(xt), (x, y), BatchRandom(0, 0, 0, 8, 8))
        assert wrong.item() > 0.1
    finally:
        torch.set_default_dtype(torch.float32)


# ----------------------------------------------------------------------------- samplers


class _Exp(torch.nn.Module):
    """v(x, t) = x: the exact flow is x(1) = e * x(0)."""

    def forward(self, x, t, y=None):
        return x


def _one_step_gain(solver: str, h: float) -> float:
    return {
        "euler": 1 + h,
        "midpoint": 1 + h + h**2 / 2,
        "heun": 1 + h + h**2 / 2,
        "rk4": 1 + h + h**2 / 2 + h**3 / 6 + h**4 / 24,
    }[solver]


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun", "rk4"])
@pytest.mark.parametrize("steps", [1, 3, 8])
@pytest.mark.parametrize("grid", ["uniform", "data-end"])
def test_fixed_step_solvers_land_where_they_should_with_the_right_nfe(solver, steps, grid):
    z = torch.randn(4, 1, 2, 2)
    x, stats = sample_ode(_Exp(), z, solver=solver, steps=steps, grid=grid)
    ts = time_grid(steps, grid).double()
    # heun's last step is Euler (EDM)
    gains = [_one_step_gain("euler" if solver == "heun" and b == 1 else solver, float(b - a))
             for a, b in zip(ts[:-1], ts[1:])]  # fmt: skip
    torch.testing.assert_close(x, z * math.prod(gains), rtol=1e-5, atol=1e-6)
    assert stats["nfe"] == (2 * steps - 1 if solver == "heun" else EVALS_PER_STEP[solver] * steps)
    assert stats["nfe"] == stats["forward_passes"]
    if solver == "rk4" and steps == 8:
        torch.testing.assert_close(x, z * math.e, rtol=1e-5, atol=1e-6)


def test_dopri5_reaches_the_exact_flow_and_counts_its_evaluations():
    z = torch.randn(4, 1, 2, 2)
    x, stats = sample_ode(_Exp(), z, solver="dopri5", rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(x, z * math.e, rtol=1e-5, atol=1e-6)
    assert stats["nfe"] >= 6 and stats["steps"] is None


def test_adaptive_solves_never_evaluate_the_velocity_outside_0_1():
    """torchdiffeq's dopri5 steps past the end of the interval and interpolates back; a student is trained on
    t in [0, 1] only, so sampling (0 -> 1) and the likelihood ODE (1 -> 0) make their last step land on the end."""
    from nfm.student.likelihood import log_likelihood

    class Recording(_AffineField):
        def forward(self, x, t, y=None):
            seen.extend(t.flatten().tolist())
            return super().forward(x, t, y)

    for tol in (1e-3, 1e-5, 1e-7):
        seen: list[float] = []
        x, _ = sample_ode(Recording(0.7), torch.randn(4, 1, 3, 3, dtype=torch.float64), solver="dopri5",
                          rtol=tol, atol=tol)  # fmt: skip
        assert 0.0 <= min(seen) and max(seen) <= 1.0, (tol, max(seen))
        assert max(seen) > 1 - 1e-6  # the last step ends at t = 1 (to float32 rounding of t0 + dt)
        seen.clear()
        log_likelihood(Recording(0.7), x, solver="dopri5", rtol=tol, atol=tol)
        assert 0.0 <= min(seen) and max(seen) <= 1.0, (tol, min(seen))


def test_euler_follows_a_straight_flow_exactly_in_one_step():
    x1 = torch.randn(3, 1, 2, 2)

    class Straight(torch.nn.Module):  # the marginal velocity towards a single data point
        def forward(self, x, t, y=None):
            return (x1 - x) / (1 - t.view(-1, 1, 1, 1))

    x, stats = sample_ode(Straight(), torch.randn(3, 1, 2, 2), solver="euler", steps=1)
    torch.testing.assert_close(x, x1)
    assert stats["nfe"] == 1


def test_guided_velocity_and_its_count():
    class Lin(torch.nn.Module):  # v = y (or 10 for the null class), constant in x and t
        def forward(self, x, t, y):
            return torch.where(y < 0, 10.0, y.float()).view(-1, 1, 1, 1).expand_as(x)

    z, y = torch.zeros(2, 1, 2, 2), torch.tensor([1, 3])
    x, stats = sample_ode(Lin(), z, y, solver="euler", steps=2, guidance=2.0, num_classes=4)
    torch.testing.assert_close(x[:, 0, 0, 0], 3 * y.float() - 2 * 10.0)  # (1 + w) v_c - w v_u over t in [0, 1]
    assert stats["nfe"] == 2 and stats["forward_passes"] == 4


def test_sampler_bad_input():
    z = torch.randn(2, 1, 2, 2)
    with pytest.raises(NFMError, match="unknown solver 'rk45'"):
        sample_ode(_Exp(), z, solver="rk45")
    with pytest.raises(NFMError, match="steps must be >= 1"):
        sample_ode(_Exp(), z, steps=0)
    with pytest.raises(NFMError, match="unknown time grid"):
        sample_ode(_Exp(), z, grid="log")
    with pytest.raises(NFMError, match="class-conditional student"):
        sample_ode(_Exp(), z, torch.tensor([0, 1]), guidance=1.0, num_classes=0)
    with pytest.raises(NFMError, match="needs labels"):
        sample_ode(_Exp(), z, None, guidance=1.0, num_classes=10)


# ----------------------------------------------------------------------------- couplings


def test_minibatch_ot_is_a_cost_reducing_permutation_equal_to_brute_force():
    g = torch.Generator().manual_seed(0)
    for n in (2, 4, 6):
        x, z = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)
        perm = ot_permutation(x, z)
        assert sorted(perm.tolist()) == list(range(n))

        def cost(p, x=x, z=z):
            return float(((x - z[list(p)]) ** 2).sum())

        best = min(itertools.permutations(range(n)), key=cost)
        assert cost(perm.tolist()) == pytest.approx(cost(best), abs=1e-9)
        assert cost(perm.tolist()) <= cost(range(n)) + 1e-12
    x, z = torch.randn(64, 1, 4, 4, generator=g), torch.randn(64, 1, 4, 4, generator=g)
    perm = ot_permutation(x, z)
    assert sorted(perm.tolist()) == list(range(64))
    assert ((x - z[perm]) ** 2).sum() < ((x - z) ** 2).sum()


def test_labelled_ot_assigns_within_each_class():
    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)
    y = torch.tensor([0, 1, 0, 1, 2, 0, 1, 2])
    perm = ot_permutation(x, z, y)
    assert sorted(perm.tolist()) == list(range(8))
    assert torch.equal(y[perm], y)  # every row keeps noise drawn for its own class's rows
    for c in (0, 1, 2):
        idx = (y == c).nonzero().flatten().tolist()

        def cost(p, idx=idx):
            return sum(float(((x[i] - z[j]) ** 2).sum()) for i, j in zip(idx, p))

        best = min(itertools.permutations(idx), key=cost)
        assert cost([int(perm[i]) for i in idx]) == pytest.approx(cost(best), abs=1e-9)


def test_ot_coupling_keeps_data_and_labels_and_permutes_the_noise():
    data = load_data(DATA)
    x, y = data.__getitems__(list(range(16)))
    rng = BatchRandom(0, 0, 0, 16, 16)
    z_ind, x1, y1 = IndependentCoupling(data).couple((x, y), BatchRandom(0, 0, 0, 16, 16))
    z_ot, x2, y2 = MinibatchOTCoupling(data).couple((x, y), rng)
    assert torch.equal(x1, x) and torch.equal(x2, x) and torch.equal(y2, y)
    assert sorted(z_ot.flatten(1).sum(1).tolist()) == pytest.approx(sorted(z_ind.flatten(1).sum(1).tolist()))
    assert ((x - z_ot) ** 2).sum() <= ((x - z_ind) ** 2).sum()


def test_nfm_coupling_reads_every_pair_once_per_epoch_across_two_processes(cache):
    coupling = PairCoupling(PairCache(cache))
    n = len(coupling.cache)  # 360
    stream = coupling.stream(seed=0, end=100)
    seen = []
    for rank in (0, 1):
        for noise, data, _label in itertools.islice(stream(rank, 2, 18, 0), n // 36):
            seen += [(round(float(a.sum()), 3), round(float(b.sum()), 3)) for a, b in zip(noise, data)]
    every = []
    for i in range(len(coupling.cache.shards)):
        sh = coupling.cache.shard(i)
        every += [
            (round(float(a.float().sum()), 3), round(float(coupling.cache.to_float(b).sum()), 3))
            for a, b in zip(sh.read("noise"), sh.read("data"))
        ]
    assert sorted(seen) == sorted(every) and len(set(every)) == n


# ----------------------------------------------------------------------------- networks


@pytest.mark.parametrize("arch", ["dit", "mlp", "conv"])
def test_velocity_networks(arch):
    cfg = StudentModelConfig(arch=arch, in_channels=3, img_size=8, num_classes=5, width=32, depth=2, heads=2)
    model = build_student(cfg)
    x, t, y = torch.randn(4, 3, 8, 8), torch.rand(4), torch.tensor([0, 4, -1, 2])
    v = model(x, t, y)
    assert v.shape == x.shape
    if arch == "conv":
        for b in model.blocks:
            torch.nn.init.normal_(b.conv2.weight, std=0.1)
    if arch == "dit":
        assert torch.equal(v, torch.zeros_like(v))  # adaLN-zero: a fresh network outputs zero
        torch.nn.init.normal_(model.out.weight, std=0.1)
        torch.nn.init.normal_(model.ada[1].weight, std=0.1)
        for b in model.blocks:
            torch.nn.init.normal_(b.ada[1].weight, std=0.1)
    # labels matter, the null class (-1) is its own embedding, time matters
    assert not torch.allclose(model(x, t, torch.tensor([0, 0, 0, 0])), model(x, t, torch.tensor([1, 1, 1, 1])))
    assert not torch.allclose(model(x, t, torch.full((4,), -1)), model(x, t, torch.zeros(4, dtype=torch.long)))
    assert not torch.allclose(model(x, t, y), model(x, 1 - t, y))


def test_invalid_student_config():
    with pytest.raises(NFMError, match="not a multiple of patch_size"):
        build_student(StudentModelConfig(in_channels=1, img_size=10, patch_size=4, num_classes=0))
    with pytest.raises(NFMError, match="'model.arch': 'unet' is not one of dit, mlp, conv"):
        build_student(StudentModelConfig(arch="unet", in_channels=1, img_size=8, num_classes=0))


# ----------------------------------------------------------------------------- training


def tiny(coupling="nfm", pairs="", **train):
    cfg = build_config(StudentRunConfig, preset=STUDENT_PRESETS["tiny"])
    cfg = replace(cfg, flow=replace(cfg.flow, coupling=coupling, pairs=pairs), data=DATA)
    return replace(cfg, train=replace(cfg.train, **train))


def test_pair_cache_that_does_not_match_the_network_is_refused(cache, tmp_path):
    cfg = tiny("nfm", str(cache))
    cfg = replace(cfg, model=replace(cfg.model, img_size=16))
    with pytest.raises(NFMError, match="gives 1x8x8 images but the student is configured for 1x16x16"):
        run_student_training(cfg, tmp_path)


def test_a_paired_student_records_the_data_of_its_cache(cache, tmp_path):
    """`--pairs KEY` with data.* left unset: the student's export records the cache's data (what `nfm
    student eval` loads again), not the digits default; a student naming other data is refused."""
    assert read_json(cache / "pairs.index.json")["data"]["config"] == asdict(DATA)  # held_out 0.9, not 0.2
    cfg = replace(tiny("nfm", str(cache), steps=2, sample_every=0), data=DataConfig())
    export = run_student_training(cfg, tmp_path / "s")
    assert load_student(export)[1]["data"] == asdict(DATA)
    other = replace(cfg, data=DataConfig(name="fashion-mnist"))
    with pytest.raises(
        NFMError, match="was built on data.name='digits', but this student has data.name='fashion-mnist'"
    ):
        run_student_training(other, tmp_path / "o")


def test_nfm_coupling_without_a_cache_is_a_clear_error(tmp_path):
    with pytest.raises(NFMError, match=r"needs a pair cache: pass --pairs KEY_OR_DIR \(flow.pairs=KEY_OR_DIR\)"):
        run_student_training(tiny("nfm", ""), tmp_path)
    with pytest.raises(
        NFMError, match="'flow.coupling': 'sinkhorn' is not one of nfm, independent, minibatch-ot, sd-ot, sb, refl"
    ):
        run_student_training(tiny("sinkhorn"), tmp_path)


@pytest.mark.parametrize("coupling", ["nfm", "minibatch-ot"])
def test_resume_gives_the_same_weights(cache, tmp_path, monkeypatch, coupling):
    import nfm.student.train as st

    cfg = tiny(coupling, str(cache), steps=12, ckpt_every=5, sample_every=0, log_every=4)
    straight = run_student_training(cfg, tmp_path / "a")
    original = st.flow_matching_loss
    calls = {"n": 0}

    def interrupting(*args, **kw):
        fn = original(*args, **kw)

        def loss_fn(model, batch, rng):
            calls["n"] += 1
            if calls["n"] == 7:
                os.kill(os.getpid(), signal.SIGINT)
            return fn(model, batch, rng)

        return loss_fn

    monkeypatch.setattr(st, "flow_matching_loss", interrupting)
    with pytest.raises(Interrupted):
        run_student_training(cfg, tmp_path / "b")
    assert list_checkpoints(tmp_path / "b")[-1].name == "step-0000007"
    monkeypatch.setattr(st, "flow_matching_loss", original)
    resumed = run_student_training(cfg, tmp_path / "b")
    a, b = load_tensors(straight / "model.safetensors"), load_tensors(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _nfm(*args, cwd, nproc=1):
    return run_nfm(*args, cwd=cwd, nproc=nproc, env={"OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("coupling", ["nfm", "independent"])
def test_two_process_gloo_run_matches_one_process(cache, tmp_path, coupling):
    common = [
        "student",
        "train",
        "--preset",
        "tiny",
        "--coupling",
        coupling,
        "--pairs",
        str(cache),
        "train.steps=5",
        "train.log_every=1",
        "train.sample_every=0",
        "data.held_out=0.9",
    ]
    _nfm(*common, "--run-dir", str(tmp_path / "one"), cwd=tmp_path)
    _nfm(*common, "--run-dir", str(tmp_path / "two"), cwd=tmp_path, nproc=2)
    one = [json.loads(x) for x in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in two] == [1, 2, 3, 4, 5]
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["lr"] == b["lr"]  # the schedule steps once per optimizer step, whatever the processes


def test_student_commands_end_to_end(cache, tmp_path):
    run = tmp_path / "run"
    out = _nfm("student", "train", "--preset", "tiny", "--pairs", str(cache), "--run-dir", str(run), cwd=tmp_path)
    assert "student export" in out.stdout and "flow.coupling" in out.stdout
    for f in (
        "config.json",
        "log.txt",
        "metrics.jsonl",
        "export/model.safetensors",
        "export/config.json",
        "samples/step-0000010.png",
        "samples/step-0000020.png",
    ):
        assert (run / f).is_file(), f
    s = _nfm(
        "student",
        "sample",
        str(run),
        "--solver",
        "heun",
        "--steps",
        "3",
        "--n",
        "10",
        "--out",
        str(tmp_path / "s"),
        cwd=tmp_path,
    )
    assert "NFE 5" in s.stdout  # heun, 3 steps: 2 x 3 - 1 (its last step is Euler)
    t = load_tensors(tmp_path / "s.safetensors")
    assert t["images"].shape == (10, 1, 8, 8) and torch.isfinite(t["images"]).all()
    assert (tmp_path / "s.png").is_file()
    ev = _nfm("student", "eval", str(run), "--n", "6", "--solver", "rk4", "--eta", "0.1", cwd=tmp_path)
    res = json.loads((run / "eval-likelihood-test.json").read_text())
    assert res["images"] == 6 and res["divergence"] == "exact" and res["eta"] == 0.1
    assert math.isfinite(res["bits_per_dim"]) and res["bits_per_dim"] > 0 and "bits_per_dim" in ev.stdout


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Per-row randomness makes 2 micro-batches of 16 the same global batch as one of 32."""
    one = run_student_training(tiny("independent", steps=4, sample_every=0), tmp_path / "one")
    two = run_student_training(tiny("independent", steps=4, sample_every=0, grad_accum=2), tmp_path / "two")
    a, b = load_tensors(one / "model.safetensors"), load_tensors(two / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    ma = [json.loads(x)["loss"] for x in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x)["loss"] for x in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert ma == pytest.approx(mb, abs=1e-5)


def test_bf16_autocast_training_runs_and_samples_in_float32(cache, tmp_path):
    """bf16 autocast changes the arithmetic (not the same weights as float32) but trains the same model; the
    export and sampling stay float32."""
    bf = run_student_training(tiny("nfm", str(cache), steps=3, sample_every=0, mixed_precision="bf16"), tmp_path / "b")
    fp = run_student_training(tiny("nfm", str(cache), steps=3, sample_every=0), tmp_path / "f")
    wb, wf = load_tensors(bf / "model.safetensors"), load_tensors(fp / "model.safetensors")
    assert any(not torch.equal(wb[k], wf[k]) for k in wb), "bf16 autocast did not change the arithmetic"
    assert max(float((wb[k] - wf[k]).abs().max()) for k in wb) < 0.05
    model, meta = load_student(bf)
    z = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the sampler turns an ambient autocast off
        x, _ = sample_ode(model, z, torch.arange(6), solver="euler", steps=2, num_classes=10)
    ref, _ = sample_ode(model, z, torch.arange(6), solver="euler", steps=2, num_classes=10)
    assert x.dtype == torch.float32 and torch.isfinite(x).all() and torch.equal(x, ref)


# ----------------------------------------------------------------------------- likelihood through the ODE


class _AffineField(torch.nn.Module):
    """v(x, t) = a x + sin(3t): x_1 = e^a x_0 + c with c = int_0^1 e^{a(1-s)} sin(3s) ds, div v = a D."""

    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, x, t, y):
        return self.a * x + torch.sin(3 * t).view(-1, 1, 1, 1)


def test_likelihood_matches_an_analytic_flow_float64():
    from nfm.student.likelihood import log_likelihood

    a, d = 0.7, 9
    s = torch.linspace(0, 1, 20001, dtype=torch.float64)
    c = float(torch.trapezoid(torch.exp(a * (1 - s)) * torch.sin(3 * s), s))
    x = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    x0 = (x - c) * math.exp(-a)
    want = torch.distributions.Normal(0.0, 1.0).log_prob(x0).flatten(1).sum(1) - a * d
    exact, stats = log_likelihood(_AffineField(a), x, solver="dopri5", rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(exact, want, atol=1e-6, rtol=0)
    assert stats["nfe"] > 2
    hutch, _ = log_likelihood(_AffineField(a), x, solver="rk4", steps=64, hutchinson=3)
    torch.testing.assert_close(hutch, want, atol=1e-6, rtol=0)  # e^T (a I) e = a D for Rademacher e
    scaled, _ = log_likelihood(_AffineField(a), x * 3, solver="dopri5", rtol=1e-10, atol=1e-10, prior_scale=3.0)
    x0s = (3 * x - c) * math.exp(-a)
    want_s = torch.distributions.Normal(0.0, 3.0).log_prob(x0s).flatten(1).sum(1) - a * d
    torch.testing.assert_close(scaled, want_s, atol=1e-6, rtol=0)


def test_exact_divergence_is_the_jacobian_trace_and_hutchinson_is_unbiased():
    from nfm.student.likelihood import _Augmented

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    net = net.double()

    class Field(torch.nn.Module):
        def forward(self, x, t, y):
            return net(x * (1 + t.view(-1, 1, 1, 1))).view_as(x)

    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64)
    _, div = _Augmented(Field(), None, None)(t, (x, None))
    for i in range(3):
        jac = torch.autograd.functional.jacobian(
            lambda v: Field()(v.view(1, 2, 2, 2), t.view(1), None).flatten(), x[i].flatten()
        )
        torch.testing.assert_close(div[i], torch.trace(jac), atol=1e-12, rtol=0)
    probes = (torch.randint(0, 2, (4000, *x.shape), generator=torch.Generator().manual_seed(1)) * 2 - 1).double()
    _, est = _Augmented(Field(), None, probes)(t, (x, None))
    assert (est - div).abs().max() < 0.05 * div.abs().max() + 0.02


def test_an_ode_solve_reports_its_nfe_as_it_goes():
    from nfm.student.sampling import sample_ode

    class Bar:
        mininterval = 0.0

        def __init__(self):
            self.shown, self.postfix = [], ""

        def set_postfix_str(self, s, refresh=True):
            self.postfix = s

        def refresh(self):
            self.shown.append(self.postfix)

    bar = Bar()
    _, stats = sample_ode(lambda x, t, y: -x, torch.randn(4, 1, 2, 2), solver="dopri5", progress=bar)
    assert stats["nfe"] > 6 and bar.shown[-1].startswith(f"dopri5 NFE {stats['nfe']}, t = ")
    assert [int(s.split()[2].rstrip(",")) for s in bar.shown] == list(range(1, stats["nfe"] + 1))


class _FailsAtTheEnd(torch.nn.Module):
    """v(x, t) = x, except that it fails at t = 1 (where a student is least trained)."""

    def forward(self, x, t, y=None):
        if (t >= 1).any():
            raise AssertionError(f"the velocity was evaluated at t = {t.max().item()}")
        return x


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_heun_never_evaluates_the_velocity_at_t_1(steps):
    x, stats = sample_ode(_FailsAtTheEnd(), torch.randn(3, 1, 2, 2), solver="heun", steps=steps)
    assert stats["nfe"] == 2 * steps - 1 and torch.isfinite(x).all()
