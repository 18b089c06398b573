"""The couplings practitioners compare NFM against: semidiscrete OT, reflow, Schrodinger bridge, any source."""

import math
from pathlib import Path

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import norm

from nfm.core.data import DataConfig, ImageDataset, load_data
from nfm.core.errors import NFMError
from nfm.core.io import load_tensors
from nfm.core.seeding import BatchRandom
from nfm.pairs.build import PairBuildConfig
from nfm.pairs.format import read_index
from nfm.pairs.reader import PairCache
from nfm.pairs.reflow import build_reflow_pairs, reflow_inputs, regeneration_error
from nfm.student import sdot
from nfm.student.couplings import (
    DataSource,
    IndependentCoupling,
    MinibatchOTCoupling,
    SchrodingerBridgeCoupling,
    SemidiscreteOTCoupling,
    Source,
    make_source,
    plan_pairs,
    sinkhorn_plan,
)
from nfm.student.paths import ProbPath
from nfm.student.reflow import StudentGenerator
from nfm.student.sampling import sample_ode
from nfm.student.train import FlowConfig, flow_matching_loss
from tests.conftest import caches, dies_on_call, make_student_export, run_nfm

DATA = DataConfig(name="digits", held_out=0.9)
F64 = torch.float64


# ----------------------------------------------------------------------------- semidiscrete OT


def _fit(x, b, cfg, group=0):
    p = sdot._Problem(x, b, torch.zeros(len(x), dtype=F64), torch.zeros(len(x), dtype=F64))
    sdot.ascend(p, cfg, group, cfg.steps)
    return p.avg


def test_sdot_symmetric_points_get_equal_weights_and_equal_shares():
    # four points on the axes of R^3 at the same distance from the origin: the symmetric answer is g = 0
    x = torch.tensor([[2.0, 0, 0], [-2.0, 0, 0], [0, 2.0, 0], [0, -2.0, 0]], dtype=F64)
    b = torch.full((4,), 0.25, dtype=F64)
    g = _fit(x, b, sdot.SDOTConfig(steps=2000, batch_size=512, lr=1.0))
    assert g.abs().max() < 0.05  # |g| in units of the cost |z - x|^2 (~8 here)
    share = sdot.shares(x, g, 200_000, seed=1, group=0)
    assert (share - 0.25).abs().max() < 0.005  # 5 sigma of 200k draws is 0.0048


def test_sdot_unequal_masses_match_the_closed_form():
    # 1-D, points -1 and +1 with masses 0.3 / 0.7: z goes to -1 iff z < (g1 - g2) / 4, so Phi((g1-g2)/4) = 0.3
    x = torch.tensor([[-1.0], [1.0]], dtype=F64)
    b = torch.tensor([0.3, 0.7], dtype=F64)
    g = _fit(x, b, sdot.SDOTConfig(steps=2000, batch_size=1024, lr=1.0))
    assert float(g[0] - g[1]) == pytest.approx(4 * norm.ppf(0.3), abs=0.03)
    share = sdot.shares(x, g, 200_000, seed=1, group=0)
    assert share.tolist() == pytest.approx([0.3, 0.7], abs=0.006)


def test_sdot_assignment_is_the_argmin_in_chunks():
    torch.manual_seed(0)
    x, z, g = torch.randn(50, 6, dtype=F64), torch.randn(30, 6, dtype=F64), torch.randn(50, dtype=F64)
    want = (torch.cdist(z, x).pow(2) - g).argmin(1)
    for chunk in (7, 50, 1000):
        assert torch.equal(sdot.assign(z, x, x.pow(2).sum(1) - g, chunk), want)


def test_sdot_fit_on_digits_is_uniform_per_class_and_resumes_bit_identically(tmp_path, monkeypatch):
    data = load_data(DATA)
    images, labels = data.tensors()
    cfg = sdot.SDOTConfig(steps=120, batch_size=256, save_every=50, check=64)
    meta = sdot.fit_sdot(images, labels, cfg, tmp_path / "a", log=lambda *a: None)
    assert meta["groups"] == 10 and meta["per_class"]
    s = meta["shares"]
    assert s["empty"] == 0.0  # every image receives noise
    # close to what an exact fit shows at the same number of draws (sampling noise alone)
    assert s["tv"] < 1.25 * s["floor_tv"] and s["max_over_mass"] < 1.5 * s["floor_max_over_mass"]
    assert sdot.fit_sdot(images, labels, cfg, tmp_path / "a", log=lambda *a: None)["fit_seconds"] == meta["fit_seconds"]

    real = dies_on_call(monkeypatch, sdot, "ascend", 3)  # dies in the third stretch (after two saved states)
    with pytest.raises(KeyboardInterrupt):
        sdot.fit_sdot(images, labels, cfg, tmp_path / "b", log=lambda *a: None)
    assert (tmp_path / "b" / sdot.PARTIAL_NAME).is_file() and not (tmp_path / "b" / sdot.META_NAME).exists()
    monkeypatch.setattr(sdot, "ascend", real)
    sdot.fit_sdot(images, labels, cfg, tmp_path / "b", log=lambda *a: None)
    a, b = (load_tensors(tmp_path / d / sdot.WEIGHTS_NAME) for d in ("a", "b"))
    assert torch.equal(a["g"], b["g"]) and torch.equal(a["share"], b["share"])


def test_sd_ot_coupling_pairs_fresh_noise_with_a_training_image_of_its_class(tmp_path):
    data = load_data(DATA)
    images, labels = data.tensors()
    cfg = sdot.SDOTConfig(steps=40, batch_size=128)
    sdot.fit_sdot(images, labels, cfg, tmp_path / "w", log=lambda *a: None)
    g, meta = sdot.load_sdot(tmp_path / "w")
    coupling = SemidiscreteOTCoupling(data, g, meta)
    x, y = images[:64], labels[:64]
    z, xc, yc = coupling.couple((x, y), BatchRandom(0, 0, 0, 64, 64))
    assert torch.equal(yc, y) and z.shape == x.shape
    flat = images.flatten(1)
    for i in range(64):  # each x is the training image of class y_i minimising |z - x_j|^2 - g_j
        cls = (labels == y[i]).nonzero().flatten()
        j = cls[((z[i].flatten().double() - flat[cls].double()).pow(2).sum(1) - g[cls]).argmin()]
        assert torch.equal(xc[i], images[j])


# ----------------------------------------------------------------------------- Schrodinger bridge


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")
def test_sinkhorn_plan_has_uniform_marginals_and_tends_to_the_exact_assignment():
    torch.manual_seed(0)
    x, z = torch.randn(24, 1, 4, 4, dtype=F64), torch.randn(24, 1, 4, 4, dtype=F64)
    for reg, tol in ((10.0, 1e-7), (1.0, 1e-7), (0.1, 1e-3)):  # regularisation far below the cost (~32)
        plan = sinkhorn_plan(x, z, reg, iters=2000, tol=1e-9)  # converges slowly: marginals within 0.1 %
        assert plan.sum(1).tolist() == pytest.approx([1 / 24] * 24, rel=tol)
        assert plan.sum(0).tolist() == pytest.approx([1 / 24] * 24, rel=tol)
    cost = torch.cdist(x.flatten(1), z.flatten(1)).pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    sharp = sinkhorn_plan(x, z, 0.05) * 24
    assert sharp[rows, cols].min() > 0.95  # a small regularisation gives the permutation of exact OT
    # pairs drawn from a plan follow it: empirical frequencies within 5 sigma of the plan's entries
    n = 200_000
    r, c = plan_pairs(sharp, torch.rand(n, dtype=F64, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(r * 24 + c, minlength=24 * 24).double().view(24, 24) / n
    p = sharp / 24
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all()


def test_sb_coupling_keeps_classes_and_needs_sigma():
    data = load_data(DATA)
    with pytest.raises(NFMError, match="flow.sigma > 0"):
        SchrodingerBridgeCoupling(data, 0.0)
    images, labels = data.tensors()
    coupling = SchrodingerBridgeCoupling(data, 0.5)
    z, x, y = coupling.couple((images[:64], labels[:64]), BatchRandom(0, 0, 0, 64, 64))
    assert z.shape == x.shape == images[:64].shape
    for i in range(64):  # every drawn x is a batch image of the drawn label
        match = [j for j in range(64) if torch.equal(images[j], x[i])]
        assert match and int(labels[match[0]]) == int(y[i])


def test_bridge_path_mean_variance_and_target_are_exact():
    path = ProbPath("bridge", sigma=0.7)
    z, x = torch.randn(1, 3, dtype=F64), torch.randn(1, 3, dtype=F64)
    t = torch.tensor([0.3], dtype=F64)
    n = 200_000
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(n, 3, generator=g, dtype=F64)
    xt, _ = path.sample(z.expand(n, 3), x.expand(n, 3), t.expand(n), eps)
    mean, var = (1 - 0.3) * z + 0.3 * x, 0.7**2 * 0.3 * 0.7
    tol = 5 * math.sqrt(var / n)
    assert (xt.mean(0) - mean[0]).abs().max() < tol
    assert (xt.var(0) - var).abs().max() < 5 * var * math.sqrt(2 / n)
    # the target is d x_t / dt at fixed eps: central finite differences in float64
    e, h = eps[:5], 1e-6
    for tv in (0.01, 0.3, 0.5, 0.97):
        tt = torch.full((5,), tv, dtype=F64)
        _, u = path.sample(z.expand(5, 3), x.expand(5, 3), tt, e)
        plus, _ = path.sample(z.expand(5, 3), x.expand(5, 3), tt + h, e)
        minus, _ = path.sample(z.expand(5, 3), x.expand(5, 3), tt - h, e)
        torch.testing.assert_close(u, (plus - minus) / (2 * h), atol=1e-6, rtol=1e-6)
    ends = path.sample(z, x, torch.tensor([0.0], dtype=F64), eps[:1])[0]
    torch.testing.assert_close(ends, z, atol=0, rtol=0)
    assert ProbPath("bridge", sigma=0.0).sample(z, x, t)[0].equal(ProbPath("linear").sample(z, x, t)[0])


# ----------------------------------------------------------------------------- any source


class _Gaussian(Source):
    spec = "toy"

    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def draw(self, rng, like):
        return self.mean + self.std * rng.randn(*like.shape[1:]).to(like.dtype)


class _GaussianData(ImageDataset):
    """Float 'images' (1, 1, 2) drawn from N(mean, std^2 I) (a fixed sample), unlabelled."""

    name, split, image_shape, num_classes, levels = "toy", "train", (1, 1, 2), 0, 1

    def __init__(self, mean, std, n=4096):
        g = torch.Generator().manual_seed(1)
        self.x = mean + std * torch.randn(n, 1, 1, 2, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitems__(self, idx):
        return self.x[idx], torch.full((len(idx),), -1)


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64),
                                       torch.nn.SiLU(), torch.nn.Linear(64, 2))  # fmt: skip

    def forward(self, x, t, y=None):
        return self.net(torch.cat([x.flatten(1), t[:, None]], 1)).view_as(x)


def _train_toy(coupling, steps=500, batch=128):
    torch.manual_seed(0)
    model = _MLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = flow_matching_loss(coupling, ProbPath("linear"), FlowConfig(), 0.0)
    data = coupling.data
    for step in range(steps):
        rows = torch.randint(len(data), (batch,), generator=torch.Generator().manual_seed(step))
        loss, _ = loss_fn(model, data.__getitems__(rows), BatchRandom(0, step, 0, batch, batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_ot_cfm_from_a_gaussian_source_learns_the_closed_form_ot_map_in_one_step():
    # source N(m0, s0^2 I), target N(m1, s1^2 I): the OT map is T(z) = m1 + (s1 / s0) (z - m0)
    m0, s0, m1, s1 = torch.tensor([-2.0, 1.0]), 0.5, torch.tensor([2.0, -1.0]), 1.5
    source, data = _Gaussian(m0.view(1, 1, 2), s0), _GaussianData(m1.view(1, 1, 2), s1)
    z = m0 + s0 * torch.randn(2000, 1, 1, 2, generator=torch.Generator().manual_seed(5))
    truth = m1 + (s1 / s0) * (z - m0)
    err = {}
    for cls in (MinibatchOTCoupling, IndependentCoupling):
        model = _train_toy(cls(data, source))
        with torch.no_grad():
            one_step = sample_ode(model, z, None, solver="euler", steps=1)[0]
        err[cls.name] = float((one_step - truth).pow(2).sum(-1).mean())  # 500 x 128: 0.10 vs 1.57 here
    assert err["minibatch-ot"] < 0.15 * s1**2  # close to T (the target's per-point variance is 2 s1^2 = 4.5)
    assert err["independent"] > 4 * err["minibatch-ot"]  # I-CFM's one-step map is far from it


def test_a_data_source_draws_training_images_of_the_source_and_checks_its_shape():
    src = make_source("data:digits", DATA, "train", (1, 8, 8))
    assert isinstance(src, DataSource)
    z = src.draw(BatchRandom(0, 0, 0, 16, 16), torch.zeros(16, 1, 8, 8))
    pool = src.images.flatten(1)
    assert all((pool == zi.flatten()).all(1).any() for zi in z)
    with pytest.raises(NFMError, match="image shape"):
        make_source("data:digits", DATA, "train", (1, 28, 28))
    with pytest.raises(NFMError, match="gaussian"):
        make_source("noise", DATA)


# ----------------------------------------------------------------------------- reflow


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_student_export(tmp_path_factory.mktemp("student"), DATA)


def _shards(cache_dir):
    return {p.name: p.read_bytes() for p in sorted(Path(cache_dir).glob("pairs-*.safetensors"))}


def test_reflow_cache_holds_the_students_ode_output_bit_for_bit(student, tmp_path):
    gen = StudentGenerator(student, solver="heun", steps=3)
    cfg = PairBuildConfig(batch_size=64, shard_rows=100, dtype="float16")
    res = build_reflow_pairs(gen, 250, cfg, tmp_path, log=lambda *a: None)
    cache = PairCache(res.path)
    index = read_index(res.path)
    # heun, 3 steps: 2 x 3 - 1 evaluations (its last step is Euler)
    assert len(cache) == 250 and index["provenance"]["solver"] == "heun" and index["provenance"]["nfe"] == 5
    assert index["key_fields"]["student"] == gen.fingerprint()
    shard = cache.shard(1)  # pairs 100..199, generated in batches 100..163 and 164..199
    ids = torch.arange(100, 164)
    z, y = reflow_inputs(ids, cfg, gen)
    want = sample_ode(gen.model, z.float(), y, solver="heun", steps=3)[0]
    assert torch.equal(shard.read("noise", 0, 64), z) and torch.equal(shard.read("label", 0, 64), ids % 10)
    assert torch.equal(shard.read("data", 0, 64), want)
    assert regeneration_error(res.path, gen)["worst_abs_error"] == 0.0
    assert build_reflow_pairs(gen, 250, cfg, tmp_path, log=lambda *a: None).hit
    other = StudentGenerator(student, solver="euler", steps=3)
    assert build_reflow_pairs(other, 250, cfg, tmp_path, log=lambda *a: None).key != res.key


def test_killed_reflow_build_resumes_byte_identically(student, tmp_path):
    cfg = PairBuildConfig(batch_size=32, shard_rows=40)
    ref = build_reflow_pairs(StudentGenerator(student, solver="euler", steps=2), 200, cfg, tmp_path / "a",
                             log=lambda *a: None)  # fmt: skip

    class Dies(StudentGenerator):
        calls = 0

        def generate(self, z, y):
            Dies.calls += 1
            if Dies.calls == 6:  # in the fourth shard
                raise KeyboardInterrupt
            return super().generate(z, y)

    with pytest.raises(KeyboardInterrupt):
        build_reflow_pairs(Dies(student, solver="euler", steps=2), 200, cfg, tmp_path / "b", log=lambda *a: None)
    (part,) = caches(tmp_path / "b")
    assert 1 <= len(_shards(part)) < 5 and not read_index(part)["complete"]
    build_reflow_pairs(StudentGenerator(student, solver="euler", steps=2), 200, cfg, tmp_path / "b",
                       log=lambda *a: None)  # fmt: skip
    assert _shards(part) == _shards(ref.path)
    assert read_index(part)["shards"] == read_index(ref.path)["shards"]


def test_reflow_cli_builds_in_two_processes_as_in_one_and_students_train_on_it(student, tmp_path):
    args = ["pairs", "build", "--from-student", str(student), "--num-pairs", "120", "--solver", "euler", "--steps", "2",
            "pairs.shard_rows=25", "--batch-size", "16"]  # fmt: skip
    run_nfm(*args, "--cache-dir", tmp_path / "one", env={"OMP_NUM_THREADS": "1"})
    run_nfm(*args, "--cache-dir", tmp_path / "two", nproc=2)
    (one,), (two,) = caches(tmp_path / "one"), caches(tmp_path / "two")
    assert one.name == two.name and _shards(one) == _shards(two) and len(_shards(one)) == 5
    out = run_nfm("pairs", "verify", one.name, "--cache-dir", tmp_path / "one", "--from-student", student, "--all")
    assert "worst |x - stored| = 0" in out.stdout
    run_nfm("student", "train", "--preset", "tiny", "--coupling", "reflow", "--pairs", str(one),
            "--run-dir", tmp_path / "s")  # fmt: skip
    assert (tmp_path / "s" / "export" / "model.safetensors").is_file()
    assert "reflow: pair cache" in (tmp_path / "s" / "log.txt").read_text()
    bad = run_nfm("pairs", "build", "--from-student", str(student), "--teacher", str(student), check=False,
                  capture=True)  # fmt: skip
    assert bad.returncode != 0 and "one of --teacher" in bad.stderr
