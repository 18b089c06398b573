"""Pretrained teachers: ml-tarflow checkpoints mapped exactly, and a user's own flow through python:."""

import os

import pytest
import torch
import torch.nn.functional as F

from nfm.core.errors import NFMError
from nfm.teacher.mltarflow import arch_from_filename, load_ml_tarflow
from nfm.teacher.protocol import Teacher, check_teacher, load_teacher_spec, parse_arch, parse_spec
from tests.conftest import run_nfm, run_nfm_inline

# ----------------------------------------------------------------------------- an ml-tarflow state dict


def ml_tarflow_state_dict(C=3, img=8, p=2, width=64, blocks=3, layers=2, classes=5, nvp=True, seed=0):
    """Random tensors with exactly the names and shapes of apple/ml-tarflow's transformer_flow.Model."""
    g = torch.Generator().manual_seed(seed)
    T, D = (img // p) ** 2, C * p * p

    def rnd(*shape, s=0.05):
        return torch.randn(*shape, generator=g) * s

    sd = {}
    for i in range(blocks):
        b = f"blocks.{i}."
        sd[b + "proj_in.weight"], sd[b + "proj_in.bias"] = rnd(width, D, s=0.3), rnd(width)
        sd[b + "pos_embed"] = rnd(T, width, s=0.5)
        if classes:
            sd[b + "class_embed"] = rnd(classes, 1, width, s=0.5)
        for j in range(layers):
            a = f"{b}attn_blocks.{j}."
            sd[a + "attention.norm.weight"], sd[a + "attention.norm.bias"] = 1 + rnd(width), rnd(width)
            sd[a + "attention.qkv.weight"], sd[a + "attention.qkv.bias"] = rnd(3 * width, width, s=0.2), rnd(3 * width)
            sd[a + "attention.proj.weight"], sd[a + "attention.proj.bias"] = rnd(width, width, s=0.1), rnd(width)
            sd[a + "mlp.norm.weight"], sd[a + "mlp.norm.bias"] = 1 + rnd(width), rnd(width)
            sd[a + "mlp.main.0.weight"], sd[a + "mlp.main.0.bias"] = rnd(4 * width, width, s=0.1), rnd(4 * width)
            sd[a + "mlp.main.2.weight"], sd[a + "mlp.main.2.bias"] = rnd(width, 4 * width, s=0.1), rnd(width)
        out = 2 * D if nvp else D
        sd[b + "proj_out.weight"], sd[b + "proj_out.bias"] = rnd(out, width, s=0.005), rnd(out, s=0.1)  # bias != 0
        sd[b + "attn_mask"] = torch.tril(torch.ones(T, T))
    sd["var"] = 0.5 + torch.rand(T, D, generator=g)
    return sd


class Reference:
    """ml-tarflow's forward / reverse, written from its public description, on the raw tensors."""

    def __init__(self, sd, C, img, p, head_dim=64, nvp=True):
        self.sd = {k: v.double() for k, v in sd.items()}
        self.C, self.img, self.p, self.hd, self.nvp = C, img, p, head_dim, nvp
        self.blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        self.layers = len({k.split(".")[3] for k in sd if k.startswith("blocks.0.attn_blocks.")})

    def lin(self, x, name):
        return x @ self.sd[name + ".weight"].T + self.sd[name + ".bias"]

    def ln(self, x, name):
        return F.layer_norm(x, x.shape[-1:], self.sd[name + ".weight"], self.sd[name + ".bias"])

    def trunk(self, i, x, y):
        b = f"blocks.{i}."
        perm = (lambda t: t.flip(0)) if i % 2 else (lambda t: t)
        T = x.shape[1]
        h = self.lin(x, b + "proj_in") + perm(self.sd[b + "pos_embed"])[:T]
        if b + "class_embed" in self.sd:
            ce = self.sd[b + "class_embed"]
            if y is None:
                h = h + ce.mean(0)
            else:
                m = (y < 0).double().view(-1, 1, 1)
                h = h + (1 - m) * ce[y] + m * ce.mean(0)
        mask = self.sd[b + "attn_mask"][:T, :T].bool()
        for j in range(self.layers):
            a = f"{b}attn_blocks.{j}."
            B, _, W = h.shape
            heads = W // self.hd
            qkv = self.lin(self.ln(h, a + "attention.norm"), a + "attention.qkv")
            q, k, v = qkv.reshape(B, T, 3 * heads, -1).transpose(1, 2).chunk(3, dim=1)  # q of all heads first
            att = (q @ k.transpose(-1, -2)) * self.hd**-0.5
            att = att.masked_fill(~mask, float("-inf")).softmax(-1)
            h = h + self.lin((att @ v).transpose(1, 2).reshape(B, T, W), a + "attention.proj")
            hm = self.ln(h, a + "mlp.norm")
            h = h + self.lin(F.gelu(self.lin(hm, a + "mlp.main.0")), a + "mlp.main.2")
        out = self.lin(h, b + "proj_out")
        if self.nvp:
            return out.chunk(2, dim=-1)
        return torch.zeros_like(out), out

    def patchify(self, x):
        return F.unfold(x, self.p, stride=self.p).transpose(1, 2)

    def unpatchify(self, x):
        return F.fold(x.transpose(1, 2), (self.img, self.img), self.p, stride=self.p)

    def forward(self, x, y):
        x = self.patchify(x)
        logdets = 0
        for i in range(self.blocks):
            perm = (lambda t: t.flip(1)) if i % 2 else (lambda t: t)
            xp = perm(x)
            a, b = self.trunk(i, xp, y)
            a = torch.cat([torch.zeros_like(a[:, :1]), a[:, :-1]], 1)
            b = torch.cat([torch.zeros_like(b[:, :1]), b[:, :-1]], 1)
            x = perm((xp - b) * torch.exp(-a))
            logdets = logdets - a.mean(dim=[1, 2])  # their convention: a mean per block
        return self.unpatchify(x), logdets

    def reverse(self, eps, y):
        x = self.patchify(eps) * self.sd["var"].sqrt()
        for i in reversed(range(self.blocks)):
            perm = (lambda t: t.flip(1)) if i % 2 else (lambda t: t)
            xp = perm(x).clone()
            for t in range(1, xp.shape[1]):
                a, b = self.trunk(i, xp[:, :t], y)
                xp[:, t] = xp[:, t] * torch.exp(a[:, -1]) + b[:, -1]
            x = perm(xp)
        return self.unpatchify(x)


@pytest.mark.parametrize(
    "C,p,classes,nvp,prefix", [(3, 2, 5, True, ""), (1, 2, 0, True, "module."), (3, 2, 4, False, "_orig_mod.")]
)
def test_ml_tarflow_checkpoint_maps_exactly(tmp_path, C, p, classes, nvp, prefix):
    img, width, blocks, layers, eta = 8, 128, 3, 2, 0.05
    sd = ml_tarflow_state_dict(C, img, p, width, blocks, layers, classes, nvp)
    path = tmp_path / f"toy_model_{p}_{width}_{blocks}_{layers}_{eta}.pth"
    torch.save({prefix + k: v for k, v in sd.items()}, path)
    model, arch = load_ml_tarflow(path)
    assert arch["in_channels"] == C and arch["num_classes"] == classes and arch["noise_std"] == eta
    assert arch["head_dim"] == 64 and arch["img_size"] == img
    model = model.double()
    ref = Reference(sd, C, img, p, nvp=nvp)

    x = torch.randn(4, C, img, img, dtype=torch.float64)
    y = torch.tensor([0, classes - 1, -1, 1]) if classes else None
    z_ref, ld_ref = ref.forward(x, y)
    z, ld = model(x, y)
    assert (z - x).abs().max() > 1e-2, "the test checkpoint must not be near the identity"
    torch.testing.assert_close(z, z_ref, atol=1e-10, rtol=0)
    D = C * img * img
    torch.testing.assert_close(ld, ld_ref * D, atol=1e-10, rtol=0)  # ours: sum of -a; theirs: mean of -a
    # their loss, 0.5 mean(z^2) - mean(logdet), is our unit-prior NLL per dimension minus 0.5 log(2 pi)
    ours = (0.5 * z.flatten(1).pow(2).sum(1) - ld) / D
    torch.testing.assert_close(ours.mean(), 0.5 * z_ref.pow(2).mean() - ld_ref.mean(), atol=1e-12, rtol=0)

    eps = torch.randn(3, C, img, img, dtype=torch.float64)
    yy = None if y is None else y[:3]
    want = ref.reverse(eps, yy)
    got = model.decode(eps * model.prior_std, yy)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    torch.testing.assert_close(model.decode(z, y), x, atol=1e-10, rtol=0)
    torch.testing.assert_close(model.var, sd["var"].double())


def test_architecture_from_file_name_and_flags():
    assert arch_from_filename("afhq_model_8_768_8_8_0.07.pth") == {
        "patch_size": 8,
        "width": 768,
        "num_blocks": 8,
        "layers_per_block": 8,
        "noise_std": 0.07,
    }
    assert arch_from_filename("weights.pth") == {}
    assert parse_arch("patch_size=8, noise_std=0.07,in_channels=3") == {
        "patch_size": 8,
        "noise_std": 0.07,
        "in_channels": 3,
    }
    with pytest.raises(NFMError, match="key=value"):
        parse_arch("patch_size")
    s = parse_spec("ml-tarflow:/x/a.pth", "noise_std=0.1")
    assert (s.kind, s.target, s.arch) == ("ml-tarflow", "/x/a.pth", {"noise_std": 0.1})
    assert parse_spec("runs/teacher-digits").kind == "export"
    with pytest.raises(NFMError, match="--teacher-arch applies to"):
        parse_spec("runs/t", "patch_size=2")


def test_bad_checkpoints_are_clear_errors(tmp_path):
    sd = ml_tarflow_state_dict(C=1, width=64, blocks=2, layers=1, classes=0)
    plain = tmp_path / "weights.pth"
    torch.save(sd, plain)
    with pytest.raises(NFMError, match="does not record its training noise eta; pass --teacher-arch noise_std="):
        load_ml_tarflow(plain)
    with pytest.raises(NFMError, match="width=32 was given but the weights say width=64"):
        load_ml_tarflow(plain, {"width": 32, "noise_std": 0.1})
    with pytest.raises(NFMError, match="unknown keys \\['depth'\\]"):
        load_ml_tarflow(plain, {"depth": 3, "noise_std": 0.1})
    model, _ = load_ml_tarflow(plain, {"noise_std": 0.1})
    assert model.cfg.in_channels == 1 and model.cfg.patch_size == 2
    with pytest.raises(NFMError, match="not found"):
        load_ml_tarflow(tmp_path / "missing.pth", {"noise_std": 0.1})
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(NFMError, match="weights_only=True"):
        load_ml_tarflow(tmp_path / "junk.pth", {"noise_std": 0.1})
    torch.save({"model": {"blocks.0.foo": torch.ones(1)}}, tmp_path / "other.pth")
    with pytest.raises(NFMError, match="not an ml-tarflow state dict"):
        load_ml_tarflow(tmp_path / "other.pth", {"noise_std": 0.1})
    extra = dict(sd, **{"blocks.0.unknown": torch.ones(2)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(NFMError, match="unexpected tensor 'blocks.0.unknown'"):
        load_ml_tarflow(tmp_path / "extra.pth", {"noise_std": 0.1})


class _Pickled:  # an arbitrary object: torch.load(weights_only=True) must refuse it
    pass


def test_pickled_objects_are_refused_in_one_line(tmp_path):
    torch.save({"blocks.0.proj_in.weight": torch.ones(2, 2), "payload": _Pickled()}, tmp_path / "evil.pth")
    with pytest.raises(NFMError, match="weights_only=True") as e:
        load_ml_tarflow(tmp_path / "evil.pth", {"noise_std": 0.1})
    msg = str(e.value)  # one line, naming the object, with no advice to unpickle it after all
    assert "\n" not in msg and "_Pickled" in msg and "weights_only=False" not in msg and "will likely" not in msg


# ----------------------------------------------------------------------------- a user's own flow


def test_python_teacher_implements_the_protocol(user_flow_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(user_flow_dir))
    teacher, info = load_teacher_spec("python:userflow:make", arch="scale=0.7")
    assert isinstance(teacher, Teacher) and info["kind"] == "python"
    assert float(teacher.s.min()) >= 0.7
    with pytest.raises(
        NFMError, match=r"lacks method encode\(\); method decode\(\); method fingerprint\(\); image_shape"
    ):
        load_teacher_spec("python:userflow:broken")
    with pytest.raises(NFMError, match="cannot import 'nosuchmodule'"):
        load_teacher_spec("python:nosuchmodule:make")
    with pytest.raises(NFMError, match="has no attribute 'nothing'"):
        load_teacher_spec("python:userflow:nothing")
    with pytest.raises(NFMError, match="expected python:package.module:factory"):
        load_teacher_spec("python:userflow")
    check_teacher(teacher, "x")


@pytest.mark.slow
def test_pretrained_teachers_end_to_end(tmp_path, user_flow_dir):
    """One command each: import an ml-tarflow checkpoint, build its pairs, train a student; and the same for
    a user's own flow through python:."""
    env = {"PYTHONPATH": f"{user_flow_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def nfm(*args, check=True):
        return run_nfm(*args, cwd=tmp_path, env=env, check=check)

    cache = ["--cache-dir", str(tmp_path / "cache")]
    sd = ml_tarflow_state_dict(C=1, img=8, p=2, width=64, blocks=2, layers=1, classes=10)
    ckpt = tmp_path / "digits_model_2_64_2_1_0.1.pth"
    torch.save(sd, ckpt)
    out = nfm("teacher", "import", f"ml-tarflow:{ckpt}", "--out", str(tmp_path / "imp"), "--data", "digits").stdout
    assert "imported" in out and "1x8x8, patch 2, width 64, 2 blocks x 1 layers, 10 classes, eta 0.1" in out
    again = run_nfm_inline("teacher", "import", f"ml-tarflow:{ckpt}", "--out", tmp_path / "imp", cwd=tmp_path)
    assert again.returncode == 2 and "already holds an export" in again.stderr
    built = nfm("pairs", "build", "--teacher", str(tmp_path / "imp"), "--views", "1", *cache).stdout
    key = built.split("key: ")[1].split()[0]
    # the same checkpoint named directly gives the same teacher, hence the same cache
    direct = nfm("pairs", "build", "--teacher", f"ml-tarflow:{ckpt}", "--data", "digits", "--views", "1", *cache)
    assert f"key: {key}" in direct.stdout and "cache hit" in direct.stdout
    verified = run_nfm_inline("pairs", "verify", key, "--teacher", f"ml-tarflow:{ckpt}", *cache, cwd=tmp_path)
    assert f"pair cache {key}: OK" in verified.stdout and "worst |decode" in verified.stdout
    run = tmp_path / "student"
    nfm("student", "train", "--preset", "tiny", "--pairs", key, "--run-dir", str(run), *cache)
    assert (run / "export" / "model.safetensors").is_file()
    no_data = run_nfm_inline("pairs", "build", "--teacher", f"ml-tarflow:{ckpt}", *cache, cwd=tmp_path)
    assert no_data.returncode == 2 and "pass --data NAME" in no_data.stderr

    built = nfm(
        "pairs",
        "build",
        "--teacher",
        "python:userflow:make",
        "--teacher-arch",
        "scale=0.6",
        "--data",
        "digits",
        "data.held_out=0.9",
        *cache,
    ).stdout
    ukey = built.split("key: ")[1].split()[0]
    verify = nfm(
        "pairs", "verify", ukey, "--teacher", "python:userflow:make", "--teacher-arch", "scale=0.6", *cache
    ).stdout
    assert f"pair cache {ukey}: OK" in verify
    err = float(verify.split("| = ")[1].split()[0])
    assert 0 < err < 1e-2  # float16 noise of an exact elementwise flow: rounding error, nothing more
    nfm("student", "train", "--preset", "tiny", "--pairs", ukey, "--run-dir", str(tmp_path / "s2"), *cache)
    assert (tmp_path / "s2" / "export" / "model.safetensors").is_file()
