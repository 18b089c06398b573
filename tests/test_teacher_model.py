"""Exactness tests of the TarFlow teacher, in float64."""

import math

import pytest
import torch

from nfm.core.errors import NFMError
from nfm.teacher.model import Guidance, TarFlow, TarFlowConfig

torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("patch_size", [1, 2, 4])
@pytest.mark.parametrize("num_classes", [0, 10])
@pytest.mark.parametrize("channels", [1, 3])
def test_decode_inverts_encode_float64(flow_factory, patch_size, num_classes, channels):
    model = flow_factory(channels=channels, patch_size=patch_size, num_classes=num_classes)
    x = torch.randn(4, channels, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 3, -1, 9]) if num_classes else None
    z, logdet = model(x, y)
    assert z.shape == x.shape and logdet.shape == (4,)
    assert (z - x).abs().max() > 1e-3, "the test model must not be the identity"
    x_rec = model.decode(z, y)
    torch.testing.assert_close(x_rec, x, atol=1e-10, rtol=0)
    # and the other way round: encode(decode(z)) == z
    z2 = torch.randn_like(x)
    torch.testing.assert_close(model.encode(model.decode(z2, y), y), z2, atol=1e-10, rtol=0)


@pytest.mark.parametrize("num_classes", [0, 4])
def test_logdet_equals_autograd_jacobian(flow_factory, num_classes):
    model = flow_factory(channels=2, img_size=4, patch_size=2, num_classes=num_classes)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    y = torch.tensor([2]) if num_classes else None
    _, logdet = model(x, y)
    jac = torch.autograd.functional.jacobian(lambda v: model.encode(v.view(1, 2, 4, 4), y).flatten(), x.flatten())
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign != 0
    torch.testing.assert_close(logdet[0], logabsdet, atol=1e-10, rtol=0)
    assert abs(float(logdet[0].detach())) > 1e-3


@pytest.mark.parametrize("block_index", [0, 1])
def test_block_is_causal_in_its_order(flow_factory, block_index):
    """dz_k/dx_j = 0 for j > k (block order), and dz_k/dx_k is diagonal: patch k's (a, b) see only x_<k."""
    model = flow_factory(channels=1, img_size=4, patch_size=2)
    block = model.blocks[block_index]
    T, dim = 4, 4
    x = torch.randn(1, T, dim, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: block(v.view(1, T, dim))[0].flatten(), x.flatten())
    jac = jac.view(T, dim, T, dim)  # (out patch, out dim, in patch, in dim), model order
    order = list(range(T))[::-1] if block.flip else list(range(T))
    jac = jac[order][:, :, order]  # block order
    for k in range(T):
        for j in range(T):
            blk = jac[k, :, j, :]
            if j > k:
                assert blk.abs().max() == 0, f"output patch {k} depends on later input patch {j}"
            elif j == k:
                assert torch.equal(blk, torch.diag(torch.diagonal(blk))), "diagonal block must be diagonal"
    assert jac[T - 1, :, 0, :].abs().max() > 0, "later patches must depend on earlier ones"


@pytest.mark.parametrize(
    "num_classes,guidance,annealed", [(0, 0.0, False), (5, 0.0, False), (5, 2.0, False), (5, 1.5, True)]
)
def test_kv_cached_decode_equals_recomputed_prefix(flow_factory, num_classes, guidance, annealed):
    model = flow_factory(channels=2, patch_size=2, num_classes=num_classes, layers_per_block=2)
    z = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 4, 2]) if num_classes else None
    kw = dict(guidance=Guidance(guidance, annealed=annealed, attn_temp=0.7))
    cached = model.decode(z, y, kv_cache=True, **kw)
    full = model.decode(z, y, kv_cache=False, **kw)
    torch.testing.assert_close(cached, full, atol=1e-12, rtol=0)


def test_guidance_changes_samples_and_zero_guidance_is_conditional(flow_factory):
    model = flow_factory(num_classes=5)
    z = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 3])
    plain = model.decode(z, y)
    torch.testing.assert_close(model.decode(z, y, guidance=Guidance(0.0)), plain, atol=0, rtol=0)
    assert (model.decode(z, y, guidance=Guidance(2.0)) - plain).abs().max() > 1e-6


def test_dropped_label_is_the_mean_class_embedding(flow_factory):
    model = flow_factory(num_classes=5)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    z_none, ld_none = model(x, None)
    z_drop, ld_drop = model(x, torch.tensor([-1, -1]))
    torch.testing.assert_close(z_none, z_drop, atol=0, rtol=0)
    assert (model.encode(x, torch.tensor([0, 0])) - z_none).abs().max() > 0


def test_fresh_model_is_the_identity():
    cfg = TarFlowConfig(
        in_channels=3, img_size=8, patch_size=2, width=32, num_blocks=3, layers_per_block=1, head_dim=16, num_classes=4
    )
    model = TarFlow(cfg).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, -1])
    z, logdet = model(x, y)
    assert torch.equal(z, x)
    assert torch.equal(logdet, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(model.decode(x, y), x)


def test_log_prob_of_identity_model_is_standard_normal():
    cfg = TarFlowConfig(
        in_channels=1, img_size=4, patch_size=2, width=16, num_blocks=2, layers_per_block=1, head_dim=8, num_classes=0
    )
    model = TarFlow(cfg).double()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(model.log_prob(x), expected, atol=1e-12, rtol=0)
    bpd = model.bits_per_dim(x)
    torch.testing.assert_close(bpd, (-expected / 16 + math.log(127.5)) / math.log(2), atol=1e-12, rtol=0)


def test_denoise_is_a_score_step(flow_factory):
    model = flow_factory(num_classes=0)
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    step = model.denoise(x) - x
    # finite-difference score at a few coordinates
    for idx in [(0, 0, 0, 0), (0, 0, 3, 5), (0, 0, 7, 7)]:
        e = torch.zeros_like(x)
        e[idx] = 1e-6
        fd = (model.log_prob(x + e) - model.log_prob(x - e)) / 2e-6
        torch.testing.assert_close(step[idx], model.noise_std**2 * fd[0], atol=1e-8, rtol=1e-6)


def test_affine_arithmetic_stays_float32_under_bf16_autocast(flow_factory):
    model = flow_factory(dtype=torch.float32, num_classes=3)
    x = torch.randn(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, -1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, logdet = model(x, y)
    assert z.dtype == torch.float32 and logdet.dtype == torch.float32
    # the transformer ran in bf16, but the result is still close to the float32 encode
    z32, _ = model(x, y)
    assert (z - z32).abs().max() < 0.05


def test_fingerprint_changes_with_weights(flow_factory):
    a, b = flow_factory(seed=0), flow_factory(seed=0)
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        b.blocks[0].proj_out.bias[0] += 1e-3
    assert a.fingerprint() != b.fingerprint()


# ----------------------------------------------------------------------------- bad input


def test_wrong_channel_count_is_a_clear_error(flow_factory):
    model = flow_factory(channels=1)
    with pytest.raises(NFMError, match=r"shape \(N, 1, 8, 8\), got \(2, 3, 8, 8\)"):
        model.encode(torch.randn(2, 3, 8, 8, dtype=torch.float64))


def test_wrong_image_size_is_a_clear_error(flow_factory):
    model = flow_factory(channels=1)
    with pytest.raises(NFMError, match=r"got \(2, 1, 16, 16\)"):
        model.decode(torch.randn(2, 1, 16, 16, dtype=torch.float64))


def test_nan_in_batch_is_a_clear_error(flow_factory):
    model = flow_factory()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    x[1, 0, 2, 2] = float("nan")
    with pytest.raises(NFMError, match=r"1 of 3 images contain NaN or Inf \(rows \[1\]\)"):
        model.encode(x)


def test_bad_labels_and_guidance_without_classes(flow_factory):
    model = flow_factory(num_classes=3)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(NFMError, match=r"labels must be in \[-1, 2\]"):
        model.encode(x, torch.tensor([0, 3]))
    with pytest.raises(NFMError, match="needs labels"):
        model.decode(x, None, guidance=Guidance(1.0))
    uncond = flow_factory(num_classes=0)
    with pytest.raises(NFMError, match="class-conditional"):
        uncond.decode(x, torch.tensor([0, 1]), guidance=Guidance(1.0))


def test_invalid_config_is_a_clear_error():
    with pytest.raises(NFMError, match="not a multiple of patch_size"):
        TarFlow(TarFlowConfig(in_channels=1, img_size=10, patch_size=4, num_classes=0))
    with pytest.raises(NFMError, match="not a multiple of head_dim"):
        TarFlow(TarFlowConfig(in_channels=1, img_size=8, width=100, head_dim=32, num_classes=0))


# ----------------------------------------------------------------------------- parallel decoding


@pytest.mark.parametrize("chunk", [0, 3, 1])
@pytest.mark.parametrize("num_classes,guidance,annealed", [(0, 0.0, False), (5, 1.5, False), (5, 2.0, True)])
def test_jacobi_decode_with_full_iterations_is_the_sequential_decode(
    flow_factory, chunk, num_classes, guidance, annealed
):
    """Capped at the chunk length, the fixed-point iteration is exact (k iterations fix k patches)."""
    model = flow_factory(channels=2, patch_size=2, num_classes=num_classes, layers_per_block=2)
    z = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 4, 2]) if num_classes else None
    kw = dict(guidance=Guidance(guidance, annealed=annealed, attn_temp=0.7))
    seq = model.decode(z, y, **kw)
    stats = {}
    par = model.decode(z, y, method="jacobi", tol=0.0, chunk=chunk, stats=stats, **kw)
    torch.testing.assert_close(par, seq, atol=1e-12, rtol=0)
    assert len(stats["iterations"]) == 2 and all(k == 15 for k in stats["iterations"])  # T - 1 = 15 patches


def test_jacobi_decode_stops_at_the_tolerance_near_the_sequential_decode(flow_factory):
    model = flow_factory(channels=1, patch_size=1, num_classes=0)  # 64 patches
    z = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    seq = model.decode(z)
    stats = {}
    par = model.decode(z, method="jacobi", tol=1e-8, stats=stats)
    assert max(stats["iterations"]) < 63, "a contracting flow must converge before the exact cap"
    assert (par - seq).abs().max() < 1e-6
    loose = model.decode(z, method="jacobi", tol=1e-2, stats=(s2 := {}))
    assert sum(s2["iterations"]) < sum(stats["iterations"])
    assert (loose - seq).abs().max() < 0.1


def test_unknown_decoder_is_a_clear_error(flow_factory):
    with pytest.raises(NFMError, match="unknown decoder 'newton'; choose one of sequential, jacobi"):
        flow_factory().decode(torch.randn(1, 1, 8, 8, dtype=torch.float64), method="newton")


# ----------------------------------------------------------------------------- STARFlow options and the prior


@pytest.mark.parametrize("scale", ["exp", "softplus"])
@pytest.mark.parametrize("layers", [1, (3, 1, 1)])
def test_starflow_options_keep_exact_inverse_and_logdet(flow_factory, scale, layers):
    model = flow_factory(
        channels=2, img_size=4, patch_size=2, num_classes=3, num_blocks=3, layers_per_block=layers, scale=scale
    )
    assert [len(b.attn_blocks) for b in model.blocks] == ([layers] * 3 if isinstance(layers, int) else list(layers))
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    y = torch.tensor([1, -1])
    z, logdet = model(x, y)
    assert (z - x).abs().max() > 1e-3
    torch.testing.assert_close(model.decode(z, y), x, atol=1e-10, rtol=0)
    torch.testing.assert_close(model.decode(z, y, method="jacobi", tol=0.0), x, atol=1e-10, rtol=0)
    jac = torch.autograd.functional.jacobian(
        lambda v: model.encode(v.view(1, 2, 4, 4), y[:1]).flatten(), x[:1].flatten()
    )
    torch.testing.assert_close(logdet[0], torch.linalg.slogdet(jac)[1], atol=1e-10, rtol=0)


def _tiny(**kw) -> TarFlowConfig:
    """A 4x4, one-channel, unconditional flow of two blocks, whose fresh output layers make it the identity."""
    return TarFlowConfig(in_channels=1, img_size=4, patch_size=2, width=16, num_blocks=2, head_dim=8, num_classes=0,
                         **kw)  # fmt: skip


def test_fresh_softplus_model_is_the_identity():
    model = TarFlow(_tiny(layers_per_block=(2, 1), scale="softplus")).double()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    z, logdet = model(x)
    torch.testing.assert_close(z, x, atol=1e-15, rtol=0)
    torch.testing.assert_close(logdet, torch.zeros(2, dtype=torch.float64), atol=1e-15, rtol=0)


def test_softplus_scale_is_finite_for_very_negative_outputs(flow_factory):
    model = flow_factory(scale="softplus")
    a = torch.tensor([-200.0, -30.0, 0.0, 30.0], dtype=torch.float64)
    log_s = model.blocks[0].log_scale(a)
    assert torch.isfinite(log_s).all()
    torch.testing.assert_close(log_s[2:], torch.log(torch.nn.functional.softplus(a[2:] + math.log(math.e - 1))))


def test_layer_list_must_match_the_blocks():
    with pytest.raises(NFMError, match="layers_per_block lists 2 blocks but num_blocks=3"):
        TarFlow(TarFlowConfig(in_channels=1, img_size=8, num_blocks=3, layers_per_block=(4, 1), num_classes=0))
    with pytest.raises(NFMError, match="'model.scale': 'tanh' is not one of exp, softplus"):
        TarFlow(TarFlowConfig(in_channels=1, img_size=8, scale="tanh", num_classes=0))


def test_prior_variance_enters_log_prob_and_sampling():
    model = TarFlow(_tiny(layers_per_block=1, noise_std=0.0)).double()  # identity flow: x = z ~ N(0, var)
    with torch.no_grad():
        model.var.copy_(torch.rand(4, 4, dtype=torch.float64) + 0.5)
    std = model.prior_std
    assert std.shape == (1, 4, 4)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, std).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(model.log_prob(x), expected, atol=1e-12, rtol=0)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(model.sample(5, generator=g, denoise=False), eps * std, atol=1e-12, rtol=0)


def test_fingerprints_of_existing_teachers_are_stable(flow_factory):
    """New options at their defaults (exp scale, unit prior) leave the cache keys of older teachers alone."""
    assert flow_factory(seed=0).fingerprint() == "09381718484db9a0"
    assert flow_factory(seed=0, num_classes=10, channels=3).fingerprint() == "022ad4ea3a77cbb6"
    assert flow_factory(seed=0, scale="softplus").fingerprint() != "09381718484db9a0"


def test_bf16_autocast_never_touches_the_affine_and_log_det_arithmetic(flow_factory, monkeypatch):
    """Under bf16 autocast only the transformer trunk may run in bf16: with the trunk's output held fixed (float32
    values that bf16 cannot represent), z and log|det| are bit-identical with and without autocast; a bf16
    rounding anywhere in shift, scale, exp or the log-det sum would change them."""
    model = flow_factory(dtype=torch.float32, num_classes=3)
    x = torch.randn(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, -1])
    gen = torch.Generator().manual_seed(0)
    fixed = {id(b): 0.1 * torch.randn(4, model.cfg.num_patches, 2 * model.cfg.patch_dim, generator=gen)
             for b in model.blocks}  # fmt: skip
    for b in model.blocks:
        monkeypatch.setattr(b, "trunk", lambda h, yy, *a, b=b, **k: fixed[id(b)].clone())
    assert any((t.to(torch.bfloat16).float() != t).any() for t in fixed.values())
    z32, ld32 = model(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z16, ld16 = model(x, y)
    assert z16.dtype == ld16.dtype == torch.float32
    assert torch.equal(z16, z32) and torch.equal(ld16, ld32)
