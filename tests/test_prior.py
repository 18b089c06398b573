"""The prior a model is sampled from: the Gaussian fitted per class to a pair cache's noise (issue 25)."""

import json

import pytest
import torch

from nfm.core.data import DataConfig, load_data
from nfm.core.errors import NFMError
from nfm.core.prior import FittedPrior, Moments, oas
from nfm.pairs.build import PairBuildConfig, build_pairs
from nfm.pairs.prior import PARTIAL_NAME, TENSORS_NAME, PriorConfig, fit_prior, load_prior, prior_dir
from nfm.pairs.reader import PairCache
from nfm.teacher.export import load_teacher
from tests.conftest import dies_on_call, make_teacher_export

DATA = DataConfig(name="digits", held_out=0.9)  # 180 training images


def _random_covariance(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.2 * torch.eye(d, dtype=torch.float64)


def test_the_fitted_gaussian_recovers_a_known_mean_and_covariance_per_class():
    d, n = 6, 40_000
    g = torch.Generator().manual_seed(0)
    truth = [(torch.randn(d, generator=g, dtype=torch.float64), _random_covariance(d, c)) for c in range(2)]
    m = Moments.zeros(3, d)
    for c, (mu, cov) in enumerate(truth):
        x = mu + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
        for part in x.split(7_000):  # streamed in pieces: the same sums
            m.add(part, torch.full((len(part),), c))
    m.count[2], m.s1[2], m.s2[2] = m.count[:2].sum(), m.s1[:2].sum(0), m.s2[:2].sum(0)
    prior, stats = FittedPrior.from_moments(m, (d,))
    for c, (mu, cov) in enumerate(truth):
        se_mean = (torch.diagonal(cov) / n).sqrt()
        assert ((prior.mean[c] - mu).abs() < 4 * se_mean).all()
        fitted = prior.chol[c] @ prior.chol[c].T
        se_cov = ((torch.outer(torch.diagonal(cov), torch.diagonal(cov)) + cov**2) / n).sqrt()
        assert ((fitted - cov).abs() < 5 * se_cov + 1e-3).all()  # + OAS's shrinkage, tiny at n >> d
        assert stats[c]["shrinkage"] < 1e-3 and stats[c]["rows"] == n
    # the pooled component is the moments of both classes together (a mixture's mean and covariance)
    mix_mean = 0.5 * (truth[0][0] + truth[1][0])
    assert ((prior.mean[2] - mix_mean).abs() < 0.05).all()
    # sampling: z = mean_c + L_c eps per label; -1 and no label take the pooled component
    eps = torch.randn(4, d, generator=g, dtype=torch.float64)
    z = prior.transform(eps, torch.tensor([0, 1, -1, 0]))
    assert torch.allclose(z[1], prior.mean[1] + prior.chol[1] @ eps[1])
    assert torch.allclose(z[2], prior.mean[2] + prior.chol[2] @ eps[2])
    assert torch.allclose(prior.transform(eps), prior.mean[2] + eps @ prior.chol[2].T)
    with pytest.raises(NFMError, match="label 5 is not a class of this prior"):
        prior.transform(eps, torch.tensor([0, 1, 5, 0]))


def test_oas_keeps_a_covariance_of_fewer_rows_than_dimensions_positive_definite():
    d, n = 50, 10
    x = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cov = torch.cov(x.T, correction=0)
    assert torch.linalg.matrix_rank(cov) < d  # singular as it is
    shrunk, rho = oas(cov, n)
    assert 0 < rho <= 1 and torch.linalg.eigvalsh(shrunk).min() > 0
    # at many rows of a non-isotropic Gaussian the shrinkage vanishes
    big = _random_covariance(d, 3)
    assert oas(big, 1e7)[1] < 1e-4


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    export = make_teacher_export(tmp_path_factory.mktemp("teacher") / "export", data=DATA)
    cfg = PairBuildConfig(views=2, shard_rows=80, dtype="float32")
    return build_pairs(load_teacher(export), load_data(DATA), cfg, root, log=lambda *a: None).path


def test_the_prior_is_the_caches_noise_per_class_fitted_once_and_checked_on_every_load(cache, tmp_path):
    pc = PairCache(cache)
    prior, meta = fit_prior(pc, PriorConfig(), log=lambda *a: None)
    noise, labels = [], []
    for i in range(len(pc.shards)):
        sf = pc.shard(i)
        noise.append(sf.read("noise").double().flatten(1))
        labels.append(sf.read("label"))
    noise, labels = torch.cat(noise), torch.cat(labels)
    assert prior.num_classes == 10 and meta["classes"] == 10 and meta["cache_key"] == pc.key
    for c in (0, 7):
        x = noise[labels == c]
        want, _ = oas(torch.cov(x.T, correction=0), len(x))
        assert torch.allclose(prior.mean[c], x.mean(0), atol=1e-10)
        assert torch.allclose(prior.chol[c] @ prior.chol[c].T, want, atol=1e-10)
        assert meta["components"][c]["rows"] == len(x)
    assert meta["components"][-1]["rows"] == len(noise)
    # reused, not refitted
    d = prior_dir(pc, PriorConfig())
    assert d.parent == cache.parent.parent / "priors"  # beside the cache root
    stamp = (d / TENSORS_NAME).stat().st_mtime_ns
    fit_prior(pc, PriorConfig(), log=lambda *a: None)
    assert (d / TENSORS_NAME).stat().st_mtime_ns == stamp
    # another cache's prior, or damaged bytes: refused in one line naming the fix
    with pytest.raises(NFMError, match=f"fitted to pair cache {pc.key}, not 0123"):
        load_prior(d, "0123")
    tensors = (d / TENSORS_NAME).read_bytes()
    (d / TENSORS_NAME).write_bytes(tensors[:-8] + bytes(8))
    with pytest.raises(NFMError, match=r"does not match its checksum; delete .* and it is fitted again"):
        fit_prior(pc, PriorConfig(), log=lambda *a: None)
    (d / TENSORS_NAME).write_bytes(tensors)
    meta_path = d / "prior.json"
    text = meta_path.read_text()
    meta_path.write_text(json.dumps(json.loads(text) | {"kind": "sdot"}))
    with pytest.raises(NFMError, match="is not the metadata of a fitted prior"):
        load_prior(d, pc.key)
    meta_path.write_text(text)


def test_a_killed_fit_resumes_to_the_same_bits(cache, tmp_path, monkeypatch):
    import shutil

    import nfm.pairs.prior as pp

    copies = []
    for name in ("a", "b"):  # the same cache in two roots: two priors fitted apart
        (tmp_path / name).mkdir()
        copies.append(PairCache(shutil.copytree(cache, tmp_path / name / "pairs" / cache.name)))
    straight, _ = fit_prior(copies[0], PriorConfig(), log=lambda *a: None)
    real = dies_on_call(monkeypatch, pp, "save_state", call=2)  # killed after the first shard was saved
    with pytest.raises(KeyboardInterrupt):
        fit_prior(copies[1], PriorConfig(), log=lambda *a: None)
    d = prior_dir(copies[1], PriorConfig())
    assert (d / PARTIAL_NAME).is_file() and not (d / "prior.json").exists()
    monkeypatch.setattr(pp, "save_state", real)
    logs = []
    resumed, _ = fit_prior(copies[1], PriorConfig(), log=logs.append)
    assert any("resuming after 1 of" in line for line in logs)
    assert torch.equal(resumed.mean, straight.mean) and torch.equal(resumed.chol, straight.chol)
    assert not (d / PARTIAL_NAME).exists()


# ----------------------------------------------------------------------------- students sampled from it


def _student_cfg(cache, steps, **sample):
    from dataclasses import replace

    from nfm.core.config import build_config
    from nfm.pipeline.presets import STUDENT_PRESETS
    from nfm.student.train import StudentRunConfig

    cfg = build_config(StudentRunConfig, preset=STUDENT_PRESETS["tiny"])
    cfg = replace(cfg, flow=replace(cfg.flow, coupling="nfm", pairs=str(cache)), data=DATA)
    train = replace(cfg.train, steps=steps, sample_every=0, ckpt_every=0, log_every=max(1, steps // 4))
    return replace(cfg, train=train, sample=replace(cfg.sample, **sample))


def test_a_student_of_a_teachers_pairs_samples_from_its_fitted_prior_and_old_exports_from_n01(cache, tmp_path):
    from nfm.core.io import read_json, write_json
    from nfm.pipeline.api import Student
    from nfm.student.sampling import student_inputs
    from nfm.student.train import load_student, run_student_training, student_prior

    export = run_student_training(_student_cfg(cache, 2), tmp_path / "s")
    model, meta = load_student(export)
    prior = student_prior(export, meta)
    fitted, _ = fit_prior(PairCache(cache), PriorConfig(), log=lambda *a: None)
    assert prior is not None and torch.equal(prior.chol, fitted.chol) and meta["prior"]["cache_key"] == cache.name
    # the export names its pair cache by key: no local path leaves the machine with it (push_to_hub)
    assert meta["flow"]["pairs"] == cache.name and str(cache.parent) not in (export / "config.json").read_text()
    a = student_inputs(meta, 20, seed=3, prior=prior)
    b = student_inputs(meta, 20, seed=3)
    assert torch.equal(a.eps, b.eps) and torch.equal(b.z, b.eps)
    assert torch.allclose(a.z.double(), prior.transform(a.eps.double(), a.labels), atol=1e-6)
    assert student_prior(export, meta, "gaussian") is None
    # the Python API and save_pretrained carry it; a damaged copy is refused in one line
    s = Student.from_pretrained(export)
    assert s.prior is not None and not torch.equal(s.sample(4, seed=1), s.sample(4, seed=1, prior="gaussian"))
    again = Student.from_pretrained(s.save_pretrained(tmp_path / "copy"))
    assert torch.equal(again.sample(4, seed=1), s.sample(4, seed=1))
    (export / "prior.safetensors").write_bytes((export / "prior.safetensors").read_bytes()[:-4] + bytes(4))
    with pytest.raises(NFMError, match="does not match the checksum in its config.json"):
        student_prior(export, meta)
    # an export written before priors (no "prior" in config.json) samples from N(0, I); asking for one is an error
    old = {k: v for k, v in read_json(export / "config.json").items() if k != "prior"}
    write_json(export / "config.json", old)
    (export / "prior.safetensors").unlink()
    assert student_prior(export, old) is None and Student.from_pretrained(export).prior is None
    with pytest.raises(NFMError, match="records no fitted prior"):
        student_prior(export, old, "fitted")
    # sample.prior=gaussian: no prior in the export
    plain = run_student_training(_student_cfg(cache, 2, prior="gaussian"), tmp_path / "g")
    assert "prior" not in load_student(plain)[1] and not (plain / "prior.safetensors").exists()


def test_a_student_trained_on_a_known_non_isotropic_noise_maps_its_own_prior_better_than_n01(cache, tmp_path):
    """Pairs whose noise is, per class, a known Gaussian far from N(0, I): the student learns the map from that
    noise, so its samples from the fitted prior land near the data and its samples from N(0, I) do not."""
    import shutil

    from nfm.core.data import load_data
    from nfm.student.sampling import sample_ode, student_inputs
    from nfm.student.train import load_student, run_student_training, student_prior
    from tests.conftest import reforge_shards

    g = torch.Generator().manual_seed(0)
    shift = 2.0 * torch.randn(10, 1, 8, 8, generator=g)  # per-class means, ~2 per pixel
    copy = shutil.copytree(cache, tmp_path / "pairs" / cache.name)

    def far(cols):
        eps = torch.randn(cols["noise"].shape, generator=g)
        return {**cols, "noise": (shift[cols["label"]] + 0.3 * eps).to(cols["noise"].dtype)}

    reforge_shards(copy, far)
    export = run_student_training(_student_cfg(copy, 300), tmp_path / "s")
    model, meta = load_student(export)
    prior = student_prior(export, meta)
    images, labels = load_data(DATA).tensors()
    per_class = {c: images[labels == c].flatten(1) for c in range(10)}

    def distance(inputs) -> float:
        x = sample_ode(model, inputs.z, inputs.y, steps=4, num_classes=10)[0].flatten(1)
        return sum(float(torch.cdist(x[i : i + 1], per_class[int(c)]).min()) for i, c in enumerate(inputs.labels))

    mine = distance(student_inputs(meta, 50, seed=5, prior=prior))
    standard = distance(student_inputs(meta, 50, seed=5))
    assert mine < 0.8 * standard, (mine, standard)  # 0.63-0.66 over five sampling seeds here


def test_the_teacher_samples_from_the_prior_fitted_to_its_own_pairs(cache, tmp_path):
    from safetensors.torch import load_file

    from nfm.teacher.export import load_teacher
    from tests.conftest import make_teacher_export, run_nfm_inline

    pc = PairCache(cache)
    teacher = make_teacher_export(tmp_path / "teacher", data=DATA)  # the cache's teacher again (seed 0)
    assert load_teacher(teacher).fingerprint() == pc.index["key_fields"]["teacher"]
    out = tmp_path / "s"
    args = ["teacher", "sample", teacher, "--n", 20, "--out", out, "--cache-dir", cache.parent, "--no-denoise"]
    p = run_nfm_inline(*args, "--prior", "fitted", "--pairs", pc.key)
    assert p.returncode == 0, p.stderr
    got = load_file(str(out.with_suffix(".safetensors")))
    fitted, _ = fit_prior(pc, PriorConfig(), log=lambda *a: None)
    model = load_teacher(teacher)
    z = fitted.transform(got["noise"].double(), got["labels"]) * pc.sigma_f * model.prior_std.double()
    assert torch.allclose(got["images"], model.decode(z.float(), got["labels"]), atol=1e-5)
    # another teacher's cache: refused, naming the fix
    other = make_teacher_export(tmp_path / "other", seed=1, data=DATA)
    p = run_nfm_inline("teacher", "sample", other, "--n", 4, "--cache-dir", cache.parent, "--prior", "fitted",
                       "--pairs", pc.key, "--out", tmp_path / "o")  # fmt: skip
    assert p.returncode != 0 and "was built by teacher" in p.stderr and "not this one" in p.stderr
    p = run_nfm_inline("teacher", "sample", teacher, "--n", 4, "--prior", "fitted", "--out", tmp_path / "o")
    assert p.returncode != 0 and "add --pairs KEY" in p.stderr


def test_pairs_prior_prints_each_class_against_n01_and_ls_says_which_caches_have_one(cache):
    from tests.conftest import run_nfm_inline

    p = run_nfm_inline("pairs", "prior", cache.name[:8], "--cache-dir", cache.parent)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("component")) :]  # after the fit's line
    assert lines[0].split()[:3] == ["component", "rows", "mean_norm"] and "kl_to_standard" in lines[0]
    assert [line.split()[0] for line in lines[1:12]] == ["class"] * 10 + ["pooled"]
    assert f"of pair cache {cache.name} (64 dimensions)" in lines[12]
    ls = run_nfm_inline("pairs", "ls", "--cache-dir", cache.parent).stdout.splitlines()
    assert ls[0].split()[-1] == "prior" and ls[1].split()[-1] == "fitted"
    v = run_nfm_inline("pairs", "verify", cache.name, "--cache-dir", cache.parent, "--samples", 0)
    assert v.returncode == 0 and "fitted prior" in v.stdout and "checksum ok; 10 class component(s): KL" in v.stdout
    lr = run_nfm_inline("pairs", "prior", cache.name, "--cache-dir", cache.parent, "--model", "lowrank", "--rank", 4)
    assert lr.returncode == 0, lr.stderr
    lines = lr.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("component"))
    assert lines[head].split()[-1] == "rank" and lines[head + 1].split()[-1] == "4"
    assert "gaussian-lowrank prior" in lines[head + 12]


def test_the_fitted_priors_density_is_the_multivariate_normals():
    g = torch.Generator().manual_seed(4)
    m = Moments.zeros(3, 4)
    for c in range(2):
        m.add(torch.randn(50, 4, generator=g, dtype=torch.float64) * (c + 1) + c, torch.full((50,), c))
    m.count[2], m.s1[2], m.s2[2] = m.count[:2].sum(), m.s1[:2].sum(0), m.s2[:2].sum(0)
    prior, _ = FittedPrior.from_moments(m, (1, 2, 2))
    scale = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64).reshape(1, 2, 2)
    z = torch.randn(6, 1, 2, 2, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, -1, 1, 0, -1])
    got = prior.scaled(scale).log_prob(z, labels)
    for i, c in enumerate([0, 1, 2, 1, 0, 2]):
        cov = prior.chol[c] @ prior.chol[c].T
        mvn = torch.distributions.MultivariateNormal(
            prior.mean[c] * scale.flatten(), cov * torch.outer(scale.flatten(), scale.flatten())
        )
        assert torch.allclose(got[i], mvn.log_prob(z[i].flatten()), atol=1e-10)
    # the sampling transform and the density agree: z = scale (mean + L eps) has the density of eps, less log|det|
    eps = torch.randn(6, 1, 2, 2, generator=g, dtype=torch.float64)
    z = prior.scaled(scale).transform(eps, labels)
    std_normal = torch.distributions.Normal(0.0, 1.0).log_prob(eps).flatten(1).sum(1)
    logdet = torch.log(torch.diagonal(prior.chol[prior.components(labels, 6)], dim1=-2, dim2=-1)).sum(-1)
    assert torch.allclose(
        prior.scaled(scale).log_prob(z, labels), std_normal - logdet - torch.log(scale).sum(), atol=1e-10
    )


def test_the_likelihood_through_the_ode_uses_the_fitted_prior_at_the_noise_end():
    from nfm.student.likelihood import log_likelihood

    class Still(torch.nn.Module):  # v = 0: x(0) = x, no divergence, so log p(x) is the prior's log density
        def forward(self, x, t, y=None):
            return 0.0 * x

    g = torch.Generator().manual_seed(2)
    m = Moments.zeros(3, 4)
    m.add(torch.randn(40, 4, generator=g, dtype=torch.float64) + 1, torch.arange(40) % 2)
    m.count[2], m.s1[2], m.s2[2] = m.count[:2].sum(), m.s1[:2].sum(0), m.s2[:2].sum(0)
    prior, _ = FittedPrior.from_moments(m, (1, 2, 2))
    x, y = torch.randn(5, 1, 2, 2, generator=g, dtype=torch.float64), torch.tensor([0, 1, 1, 0, -1])
    lp, _ = log_likelihood(Still(), x, y, solver="euler", steps=2, prior=prior)
    assert torch.allclose(lp, prior.log_prob(x, y), atol=1e-12)
    lp0, _ = log_likelihood(Still(), x, y, solver="euler", steps=2)
    assert torch.allclose(lp0, torch.distributions.Normal(0.0, 1.0).log_prob(x).flatten(1).sum(1), atol=1e-12)


# ----------------------------------------------------------------------------- the low-rank + diagonal model


def _lowrank_fit(x: torch.Tensor, labels: torch.Tensor, groups: int, rank: int):
    """Both passes of a low-rank fit over rows streamed in pieces (the last group: every row)."""
    from nfm.core.prior import LowRankPrior, Sketch

    sk = Sketch.zeros(groups, x.shape[1], rank)
    for stage in range(2):
        if stage == 1:
            sk.start_second_pass()
        for part, lab in zip(x.split(7_000), labels.split(7_000)):
            sk.add(part, lab)
            sk.add(part, torch.full_like(lab, groups - 1))
    return LowRankPrior.from_sketch(sk, (x.shape[1],), rank)


def test_the_low_rank_prior_recovers_a_known_low_rank_plus_diagonal_covariance():
    d, r, n = 30, 3, 40_000
    g = torch.Generator().manual_seed(5)
    w = torch.randn(d, r, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.5], dtype=torch.float64)
    psi = 0.2 + torch.rand(d, generator=g, dtype=torch.float64)
    cov, mu = w @ w.T + torch.diag(psi), torch.randn(d, generator=g, dtype=torch.float64)
    x = mu + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    prior, stats = _lowrank_fit(x, torch.zeros(n, dtype=torch.long), 2, r)
    # the sampling transform is a square root of the fitted covariance: its columns are z(e_i) - mean
    root = prior.transform(torch.eye(d, dtype=torch.float64), torch.zeros(d, dtype=torch.long)) - prior.mean[0]
    fitted = root.T @ root
    assert ((prior.mean[0] - mu).abs() < 4 * (torch.diagonal(cov) / n).sqrt()).all()
    assert torch.allclose(torch.diagonal(fitted), x.var(0, correction=0), atol=1e-8)  # every variance kept
    # what the streamed sketch approximates: the sample covariance's top r eigenpairs + the rest of its diagonal
    sample = torch.cov(x.T, correction=0)
    lam, u = torch.linalg.eigh(sample)
    lam, u = lam.flip(0)[:r], u.flip(1)[:, :r]
    exact = u @ torch.diag(lam) @ u.T + torch.diag(torch.diagonal(sample) - (u**2 * lam).sum(1))
    assert (fitted - exact).abs().max() < 1e-2 * exact.abs().max()
    # and the truth, as closely as the sample covariance itself is
    assert (fitted - cov).norm() < 1.3 * (sample - cov).norm()
    assert stats[0]["rank"] == r and stats[0]["rows"] == n
    # its density is the multivariate normal of that covariance (Woodbury), scaled or not
    z = torch.randn(5, d, generator=g, dtype=torch.float64) * 2
    mvn = torch.distributions.MultivariateNormal(prior.mean[0], fitted)
    assert torch.allclose(prior.log_prob(z, torch.zeros(5, dtype=torch.long)), mvn.log_prob(z), atol=1e-9)
    s = 0.7
    mvn_s = torch.distributions.MultivariateNormal(prior.mean[0] * s, fitted * s * s)
    assert torch.allclose(prior.scaled(s).log_prob(z, torch.zeros(5, dtype=torch.long)), mvn_s.log_prob(z), atol=1e-9)


@pytest.mark.parametrize("call", [2, 8])  # killed in the first pass / in the second
def test_a_killed_low_rank_fit_resumes_to_the_same_bits_in_either_pass(cache, tmp_path, monkeypatch, call):
    import shutil

    import nfm.pairs.prior as pp

    cfg = PriorConfig(model="lowrank", rank=4)
    copies = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        copies.append(PairCache(shutil.copytree(cache, tmp_path / name / "pairs" / cache.name)))
    straight, meta = fit_prior(copies[0], cfg, log=lambda *a: None)
    assert meta["model"] == "gaussian-lowrank" and meta["config"]["rank"] == 4 and straight.rank == 4
    shards = len(copies[0].shards)
    assert shards == 5  # call 2 stops pass 1 (after 1 shard); call 8 stops pass 2 (after 2)
    real = dies_on_call(monkeypatch, pp, "save_state", call=call)
    with pytest.raises(KeyboardInterrupt):
        fit_prior(copies[1], cfg, log=lambda *a: None)
    monkeypatch.setattr(pp, "save_state", real)
    logs = []
    resumed, _ = fit_prior(copies[1], cfg, log=logs.append)
    assert any(f"(pass {1 if call <= shards else 2})" in line for line in logs), logs
    for name, t in straight.tensors().items():
        assert torch.equal(resumed.tensors()[name], t), name
    # another rank is another artifact; auto is full at 64 dimensions
    assert prior_dir(copies[0], PriorConfig(model="lowrank", rank=5)) != prior_dir(copies[0], cfg)
    assert prior_dir(copies[0], PriorConfig()) == prior_dir(copies[0], PriorConfig(model="full"))


def test_auto_fits_the_low_rank_model_where_a_full_covariance_per_class_would_not_fit(monkeypatch):
    import nfm.core.prior as core
    from nfm.pairs.prior import resolve

    assert resolve(PriorConfig(), (3, 8, 8), 10).model == "full"
    monkeypatch.setattr(core, "MAX_FULL_BYTES", 11 * 192 * 192 * 8 - 1)  # one byte short of 11 classes of 192^2
    assert resolve(PriorConfig(), (3, 8, 8), 10).model == "lowrank"
    assert resolve(PriorConfig(per_class=False), (3, 8, 8), 10).model == "full"
    with pytest.raises(NFMError, match="low-rank \\+ diagonal model"):
        Moments.zeros(11, 192)
    with pytest.raises(NFMError, match="prior model 'pca' is not one of auto, full, lowrank"):
        resolve(PriorConfig(model="pca"), (3, 8, 8), 10)
