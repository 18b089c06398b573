"""TarFlow: a normalizing flow of autoregressive transformer blocks over image patches.

Per MetaBlock, in that block's patch order (identity for even blocks, reversed for odd ones):

    h_t       = Transformer_causal(proj_in(x_<=t) + pos_t + class(y))      # (b, t, width)
    (a, b)_t  = proj_out(h_{t-1}),  (a, b)_0 = 0                            # shifted one patch right
    z_t       = (x_t - b_t) * exp(-a_t)                                      # forward, all t in parallel
    x_t       = z_t * exp(a_t) + b_t                                         # reverse, t = 1 .. T-1 in turn
    log|det dz/dx| = -sum_t,d a_t,d

The output projection is zero-initialised, so every fresh block (and model) is the identity.
The affine arithmetic runs in float32 (float64 if the input is float64) whatever the autocast
dtype of the transformer. Names follow apple/ml-tarflow (MetaBlock, proj_in, attn_blocks, proj_out).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from pipeline.errors import NFMError


@dataclass(frozen=True)
class TarFlowConfig:
    in_channels: int = 0  # image channels; 0: take them from the data
    img_size: int = 0  # square images; 0: take it from the data
    patch_size: int = 2  # patches of patch_size^2 pixels; T = (img_size / patch_size)^2 tokens
    width: int = 128  # transformer width
    num_blocks: int = 4  # MetaBlocks (flow steps), alternating patch order
    layers_per_block: int = 2  # transformer layers in each MetaBlock
    head_dim: int = 32  # attention head width; heads = width / head_dim
    expansion: int = 4  # MLP hidden = expansion * width
    num_classes: int = -1  # -1: from the data; 0: unconditional
    noise_std: float = 0.1  # eta: the model is trained on x + eta * eps

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size**2

    def resolved(self, channels: int, img_size: int, num_classes: int) -> TarFlowConfig:
        """Fill the data-dependent fields (0 / -1) from the data set."""
        return replace(
            self,
            in_channels=self.in_channels or channels,
            img_size=self.img_size or img_size,
            num_classes=num_classes if self.num_classes < 0 else self.num_classes,
        )

    def validate(self) -> None:
        problems = []
        if self.in_channels <= 0 or self.img_size <= 0:
            problems.append(f"in_channels={self.in_channels} and img_size={self.img_size} must be set (> 0)")
        elif self.img_size % self.patch_size:
            problems.append(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        if self.width % self.head_dim:
            problems.append(f"width={self.width} is not a multiple of head_dim={self.head_dim}")
        if min(self.patch_size, self.width, self.num_blocks, self.layers_per_block, self.expansion) <= 0:
            problems.append("patch_size, width, num_blocks, layers_per_block and expansion must be positive")
        if self.num_classes < 0:
            problems.append("num_classes is unresolved (-1); resolve it from the data first")
        if not self.noise_std >= 0:
            problems.append(f"noise_std={self.noise_std} must be >= 0")
        if problems:
            raise NFMError("invalid TarFlow config: " + "; ".join(problems))


# Named sizes, DiT-style. The data-dependent fields come from the data set.
TARFLOW_SIZES: dict[str, dict] = {
    "tiny": dict(patch_size=2, width=32, num_blocks=2, layers_per_block=1, head_dim=16),  # tests
    "digits8": dict(patch_size=2, width=128, num_blocks=4, layers_per_block=2, head_dim=32),  # 8x8: 16 tokens
    "mnist28": dict(patch_size=4, width=128, num_blocks=4, layers_per_block=2, head_dim=32),  # 28x28: 49 tokens
    "mnist28-large": dict(patch_size=4, width=256, num_blocks=4, layers_per_block=4, head_dim=64),  # GPU
}


def _affine_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class KVCache:
    """Pre-allocated keys and values of one attention layer for patch-by-patch decoding."""

    def __init__(self, batch: int, heads: int, length: int, head_dim: int, dtype, device):
        self.k = torch.empty(batch, heads, length, head_dim, dtype=dtype, device=device)  # (b, h, t, d)
        self.v = torch.empty_like(self.k)


class Attention(nn.Module):
    def __init__(self, width: int, head_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.heads, self.head_dim = width // head_dim, head_dim

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0, q_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, t, c = x.shape
        h = self.norm(x.to(_affine_dtype(x))).type(x.dtype)  # LayerNorm in float32 (float64 stays)
        # features viewed as (3 * heads, head_dim): q of every head first, then k, then v
        q, k, v = self.qkv(h).reshape(b, t, 3 * self.heads, self.head_dim).transpose(1, 2).chunk(3, dim=1)
        if q_scale is not None:  # per-sample attention temperature: softmax(q k^T / (sqrt(d) * temp))
            q = q * q_scale.to(q.dtype)  # (b, 1, 1, 1)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, h, t, d)
        else:
            assert t == 1, "cached attention decodes one patch at a time"
            cache.k[:, :, pos : pos + 1] = k
            cache.v[:, :, pos : pos + 1] = v
            out = F.scaled_dot_product_attention(q, cache.k[:, :, : pos + 1], cache.v[:, :, : pos + 1])
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, width: int, expansion: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.main = nn.Sequential(nn.Linear(width, width * expansion), nn.GELU(), nn.Linear(width * expansion, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(self.norm(x.to(_affine_dtype(x))).type(x.dtype))


class AttentionBlock(nn.Module):
    def __init__(self, width: int, head_dim: int, expansion: int):
        super().__init__()
        self.attention = Attention(width, head_dim)
        self.mlp = MLP(width, expansion)

    def forward(self, x, cache=None, pos=0, q_scale=None):
        x = x + self.attention(x, cache, pos, q_scale)
        return x + self.mlp(x)


class MetaBlock(nn.Module):
    """One flow step: an autoregressive affine transform of the patch sequence."""

    def __init__(self, cfg: TarFlowConfig, flip: bool):
        super().__init__()
        width, dim, T = cfg.width, cfg.patch_dim, cfg.num_patches
        self.flip = flip
        self.proj_in = nn.Linear(dim, width)
        self.pos_embed = nn.Parameter(torch.randn(T, width) * 1e-2)  # (t, width), in model patch order
        self.class_embed = nn.Parameter(torch.randn(cfg.num_classes, 1, width) * 1e-2) if cfg.num_classes else None
        self.attn_blocks = nn.ModuleList(
            AttentionBlock(width, cfg.head_dim, cfg.expansion) for _ in range(cfg.layers_per_block)
        )
        self.proj_out = nn.Linear(width, 2 * dim)  # -> (a, b); zero: the block starts as the identity
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def permute(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Model order <-> this block's order (the reversal is its own inverse)."""
        return x.flip(dim) if self.flip else x

    def class_cond(self, y: torch.Tensor | None) -> torch.Tensor | float:
        """Class embedding (b, 1, width); label -1 (or y=None) gets the mean of the class embeddings."""
        if self.class_embed is None:
            return 0.0
        mean = self.class_embed.mean(dim=0, keepdim=True)  # (1, 1, width)
        if y is None:
            return mean
        emb = self.class_embed[y.clamp(min=0)]  # (b, 1, width)
        return torch.where((y < 0).view(-1, 1, 1), mean, emb)

    def trunk(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None,
        caches: list[KVCache] | None = None,
        pos: int = 0,
        q_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw (a, b) for the patch *after* each input patch. x: (b, t, dim) in block order from `pos`."""
        t = x.shape[1]
        pos_embed = self.permute(self.pos_embed, dim=0)[pos : pos + t]
        h = self.proj_in(x) + pos_embed + self.class_cond(y)  # (b, t, width)
        for j, layer in enumerate(self.attn_blocks):
            h = layer(h, None if caches is None else caches[j], pos, q_scale)
        return self.proj_out(h)  # (b, t, 2 * dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Data -> noise for all patches in parallel. x: (b, t, dim) in model order. Returns (z, logdet (b,))."""
        x = self.permute(x)
        out = self.trunk(x, y)
        out = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)  # shift: patch 0 passes through
        dt = _affine_dtype(x)
        a, b = out.to(dt).chunk(2, dim=-1)  # (b, t, dim) each
        z = (x.to(dt) - b) * torch.exp(-a)
        return self.permute(z), -a.sum(dim=(1, 2))

    @torch.no_grad()
    def reverse(
        self,
        z: torch.Tensor,
        y: torch.Tensor | None = None,
        guidance: float = 0.0,
        guide_what: str = "ab",
        annealed_guidance: bool = False,
        attn_temp: float = 1.0,
        kv_cache: bool = True,
    ) -> torch.Tensor:
        """Noise -> data, patch by patch. With guidance, a conditional and an unconditional pass run as
        one batch; the unconditional branch attends with temperature `attn_temp` (as in ml-tarflow)."""
        dt = _affine_dtype(z)
        x = self.permute(z).to(dt).clone()  # decoded in place, in block order
        n, T, _ = x.shape
        guided = guidance != 0.0
        yy, q_scale = y, None
        if guided:
            yy = torch.cat([y, torch.full_like(y, -1)])
            q_scale = torch.cat([torch.ones(n), torch.full((n,), 1.0 / attn_temp)]).to(x.device).view(-1, 1, 1, 1)
        param_dtype = self.proj_in.weight.dtype
        caches = None
        if kv_cache:
            m = self.attn_blocks[0].attention
            caches = [
                KVCache(2 * n if guided else n, m.heads, T, m.head_dim, param_dtype, x.device) for _ in self.attn_blocks
            ]
        for i in range(T - 1):
            inp = x[:, i : i + 1] if kv_cache else x[:, : i + 1]
            inp = torch.cat([inp, inp]) if guided else inp
            out = self.trunk(inp.to(param_dtype), yy, caches, i if kv_cache else 0, q_scale)[:, -1]
            a, b = out.to(dt).chunk(2, dim=-1)  # (b, dim) each: parameters of patch i + 1
            if guided:
                g = guidance * (i + 1) / (T - 1) if annealed_guidance else guidance
                (a_c, a_u), (b_c, b_u) = a.chunk(2), b.chunk(2)
                a = a_c + g * (a_c - a_u) if "a" in guide_what else a_c
                b = b_c + g * (b_c - b_u) if "b" in guide_what else b_c
            x[:, i + 1] = x[:, i + 1] * torch.exp(a) + b
        return self.permute(x)


class TarFlow(nn.Module):
    """The teacher: encode (data -> noise, one parallel pass), decode (noise -> data), log_prob, denoise."""

    def __init__(self, cfg: TarFlowConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.blocks = nn.ModuleList(MetaBlock(cfg, flip=bool(i % 2)) for i in range(cfg.num_blocks))

    # ------------------------------------------------------------------ shapes and checks
    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.cfg.in_channels, self.cfg.img_size, self.cfg.img_size)

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def noise_std(self) -> float:
        return self.cfg.noise_std

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        # (b, c, H, W) -> (b, t, c*p*p), channel-major within a patch (= F.unfold's order)
        p = self.cfg.patch_size
        return rearrange(x, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, s = self.cfg.patch_size, self.cfg.img_size // self.cfg.patch_size
        return rearrange(x, "b (h w) (c p1 p2) -> b c (h p1) (w p2)", h=s, w=s, p1=p, p2=p)

    def check_images(self, x: torch.Tensor, what: str = "input", finite: bool = True) -> None:
        c, h, w = self.image_shape
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise NFMError(
                f"{what}: this teacher takes images of shape (N, {c}, {h}, {w}), got {got}. "
                "Check the data's channels and image size (data.channels, data.image_size) against the teacher's"
            )
        if not x.is_floating_point():
            raise NFMError(f"{what}: expected float images in [-1, 1], got dtype {x.dtype}")
        if finite:
            bad = ~torch.isfinite(x).flatten(1).all(dim=1)
            if bad.any():
                rows = bad.nonzero().flatten()[:8].tolist()
                raise NFMError(
                    f"{what}: {int(bad.sum())} of {x.shape[0]} images contain NaN or Inf "
                    f"(rows {rows}); clean the data before encoding"
                )

    def check_labels(self, y: torch.Tensor | None, n: int) -> torch.Tensor | None:
        if y is None or self.num_classes == 0:
            return None
        y = torch.as_tensor(y)
        if y.shape != (n,) or y.is_floating_point():
            raise NFMError(f"labels must be an int64 tensor of shape ({n},), got {tuple(y.shape)} {y.dtype}")
        if ((y < -1) | (y >= self.num_classes)).any():
            raise NFMError(
                f"labels must be in [-1, {self.num_classes - 1}] (-1: no label), got "
                f"min {int(y.min())}, max {int(y.max())}"
            )
        return y.long()

    # ------------------------------------------------------------------ the flow
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The training hot path: encode without the finiteness check. x: (b, c, H, W)."""
        self.check_images(x, finite=False)
        y = self.check_labels(y, x.shape[0])
        h = self.patchify(x)
        logdet = torch.zeros(x.shape[0], dtype=_affine_dtype(x), device=x.device)
        for block in self.blocks:
            h, ld = block(h, y)
            logdet = logdet + ld
        return self.unpatchify(h), logdet

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Data -> noise in one parallel pass: (z (b, c, H, W), log|det dz/dx| (b,))."""
        self.check_images(x, "encode")
        return self(x, y)

    @torch.no_grad()
    def decode(
        self,
        z: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        guidance: float = 0.0,
        guide_what: str = "ab",
        annealed_guidance: bool = False,
        attn_temp: float = 1.0,
        kv_cache: bool = True,
    ) -> torch.Tensor:
        """Noise -> data, patch by patch with a KV cache (kv_cache=False recomputes the prefix).

        guidance w: a <- a_c + w (a_c - a_u) (likewise b); annealed: w_i = w (i + 1) / (T - 1).
        """
        self.check_images(z, "decode")
        y = self.check_labels(y, z.shape[0])
        if guidance != 0.0:
            if self.num_classes == 0:
                raise NFMError("classifier-free guidance needs a class-conditional teacher; this one has no classes")
            if y is None:
                raise NFMError("classifier-free guidance needs labels y to guide towards")
            if attn_temp <= 0:
                raise NFMError(f"attn_temp must be > 0, got {attn_temp}")
        h = self.patchify(z)
        for block in reversed(self.blocks):
            h = block.reverse(h, y, guidance, guide_what, annealed_guidance, attn_temp, kv_cache)
        return self.unpatchify(h)

    def log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x) in nats, (b,): log N(z; 0, I) + log|det dz/dx|."""
        z, logdet = self.encode(x, y)
        d = z[0].numel()
        return -0.5 * z.flatten(1).pow(2).sum(1) - 0.5 * d * math.log(2 * math.pi) + logdet

    def bits_per_dim(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """-log2 p(x) / D on the 8-bit pixel scale (x = u / 127.5 - 1), (b,)."""
        return nll_to_bpd(-self.log_prob(x, y) / x[0].numel())

    def denoise(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """One score step x + eta^2 * grad_x log p(x) (Tweedie: the model was trained on x + eta * eps)."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_prob(xg, y).sum(), xg)
        return (x + self.noise_std**2 * grad).detach()

    @torch.no_grad()
    def sample(
        self,
        n: int,
        y: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        denoise: bool = True,
        **decode_kwargs,
    ) -> torch.Tensor:
        p = next(self.parameters())
        z = torch.randn(n, *self.image_shape, generator=generator).to(p.device, p.dtype) * temperature
        x = self.decode(z, y, **decode_kwargs)
        return self.denoise(x, y) if denoise and self.noise_std > 0 else x

    def fingerprint(self) -> str:
        """sha256 of the config and every weight: the teacher's identity in cache keys."""
        h = hashlib.sha256(json.dumps(asdict(self.cfg), sort_keys=True).encode())
        for k, v in sorted(self.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]


def nll_to_bpd(nll_per_dim: torch.Tensor | float) -> torch.Tensor | float:
    """nats per dimension of x in [-1, 1] -> bits per dimension on the [0, 255] pixel scale."""
    return (nll_per_dim + math.log(127.5)) / math.log(2)
