"""TarFlow: a normalizing flow of autoregressive transformer blocks over image patches.

Per MetaBlock, in that block's patch order (identity for even blocks, reversed for odd ones):

    h_t       = Transformer_causal(proj_in(x_<=t) + pos_t + class(y))      # (b, t, width)
    (a, b)_t  = proj_out(h_{t-1}),  (a, b)_0 = 0                            # shifted one patch right
    z_t       = (x_t - b_t) * exp(-a_t)                                      # forward, all t in parallel
    x_t       = z_t * exp(a_t) + b_t                                         # reverse, t = 1 .. T-1 in turn
    log|det dz/dx| = -sum_t,d a_t,d

With `scale="softplus"` (STARFlow) the scale is s_t = softplus(a_t + log(e - 1)) instead of exp(a_t)
(1 at a_t = 0, so a fresh block is still the identity): z_t = (x_t - b_t) / s_t, log|det| = -sum log s_t.
`layers_per_block` may be a list, one entry per block (STARFlow's deep-shallow layout, e.g. 8,2,2,2).

Decoding is sequential over patches (KV-cached), or a parallel fixed-point iteration per block
(`decode(..., method="jacobi")`): all patches of a chunk are updated at once from the previous
iterate until the largest change is below `tol` (Gauss-Seidel over chunks, Jacobi within one).

The prior is N(0, diag(var)), `var` a (patches, channels * p^2) buffer as in apple/ml-tarflow (ones for
teachers trained here): `sample` decodes eps * sqrt(var); `encode` / `decode` are exact inverses.

The output projection is zero-initialised, so every fresh block (and model) is the identity.
The affine arithmetic runs in float32 (float64 if the input is float64) whatever the autocast
dtype of the transformer. Names follow apple/ml-tarflow (MetaBlock, proj_in, attn_blocks, proj_out).
"""

from __future__ import annotations

import hashlib
import json
import math
import typing
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from nfm.core.config import ShapedByData, check_choices, one_of
from nfm.core.errors import NFMError
from nfm.core.metrics import nll_to_bpd
from nfm.teacher.sizes import DECODERS, TARFLOW_SIZES, Decoder  # noqa: F401 (re-exported)

Scale = Literal["exp", "softplus"]
SCALES: tuple[str, ...] = typing.get_args(Scale)


@dataclass(frozen=True)
class TarFlowConfig(ShapedByData):
    in_channels: int = 0  # image channels; 0: take them from the data
    img_size: int = 0  # square images; 0: take it from the data
    patch_size: int = 2  # patches of patch_size^2 pixels; T = (img_size / patch_size)^2 tokens
    width: int = 128  # transformer width
    num_blocks: int = 4  # MetaBlocks (flow steps), alternating patch order
    layers_per_block: int | tuple[int, ...] = 2  # transformer layers per MetaBlock; a list: one per block
    head_dim: int = 32  # attention head width; heads = width / head_dim
    expansion: int = 4  # MLP hidden = expansion * width
    num_classes: int = -1  # -1: from the data; 0: unconditional
    noise_std: float = 0.1  # eta: the model is trained on x + eta * eps
    scale: Scale = "exp"  # affine scale: exp(a) (TarFlow) | softplus (STARFlow)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size**2

    @property
    def block_layers(self) -> tuple[int, ...]:
        """Transformer layers of each block, in block order (data -> noise)."""
        if isinstance(self.layers_per_block, int):
            return (self.layers_per_block,) * self.num_blocks
        return tuple(self.layers_per_block)

    def validate(self) -> None:
        check_choices(self, "model.")
        problems = []
        if self.in_channels <= 0 or self.img_size <= 0:
            problems.append(f"in_channels={self.in_channels} and img_size={self.img_size} must be set (> 0)")
        elif self.img_size % self.patch_size:
            problems.append(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        if self.width % self.head_dim:
            problems.append(f"width={self.width} is not a multiple of head_dim={self.head_dim}")
        if min(self.patch_size, self.width, self.num_blocks, *self.block_layers, self.expansion) <= 0:
            problems.append("patch_size, width, num_blocks, layers_per_block and expansion must be positive")
        if len(self.block_layers) != self.num_blocks:
            problems.append(
                f"layers_per_block lists {len(self.block_layers)} blocks but num_blocks={self.num_blocks}; "
                "give one entry per block (deep-shallow, e.g. 8,2,2,2) or a single number"
            )
        if self.num_classes < 0:
            problems.append("num_classes is unresolved (-1); resolve it from the data first")
        if not self.noise_std >= 0:
            problems.append(f"noise_std={self.noise_std} must be >= 0")
        if problems:
            raise NFMError("invalid TarFlow config: " + "; ".join(problems))


SOFTPLUS_SHIFT = math.log(math.e - 1.0)  # softplus(a + shift) = 1 at a = 0


def _affine_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance of a decode: a <- a_c + w (a_c - a_u), likewise b (as in apple/ml-tarflow).

    weight      w; 0 switches guidance off
    what        which affine parameters are guided: "a", "b" or "ab"
    annealed    w_p = w * p / (T - 1) for patch p: no guidance on the first patch, full on the last
    attn_temp   attention temperature of the unconditional branch
    """

    weight: float = 0.0
    what: Literal["a", "b", "ab"] = "ab"
    annealed: bool = False
    attn_temp: float = 1.0

    @property
    def active(self) -> bool:
        return self.weight != 0.0


NO_GUIDANCE = Guidance()


@dataclass
class _DecodeState:
    """What one block's decode carries from patch to patch."""

    dtype: torch.dtype  # the affine arithmetic's dtype
    n: int  # samples (the batch holds 2n rows under guidance: conditional, then unconditional)
    guidance: Guidance
    y: torch.Tensor | None  # labels of all rows (-1 for the unconditional half)
    q_scale: torch.Tensor | None  # per-row attention temperature, (rows, 1, 1, 1)
    caches: list[KVCache] | None


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
        else:  # t new patches at positions pos .. pos + t - 1, attending to the cached prefix and causally
            cache.k[:, :, pos : pos + t] = k
            cache.v[:, :, pos : pos + t] = v
            keys, values = cache.k[:, :, : pos + t], cache.v[:, :, : pos + t]
            mask = None if t == 1 else torch.ones(t, pos + t, dtype=torch.bool, device=x.device).tril(pos)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
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

    def __init__(self, cfg: TarFlowConfig, flip: bool, layers: int):
        super().__init__()
        width, dim, T = cfg.width, cfg.patch_dim, cfg.num_patches
        self.flip = flip
        self.softplus = cfg.scale == "softplus"
        self.proj_in = nn.Linear(dim, width)
        self.pos_embed = nn.Parameter(torch.randn(T, width) * 1e-2)  # (t, width), in model patch order
        self.class_embed = nn.Parameter(torch.randn(cfg.num_classes, 1, width) * 1e-2) if cfg.num_classes else None
        self.attn_blocks = nn.ModuleList(AttentionBlock(width, cfg.head_dim, cfg.expansion) for _ in range(layers))
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

    def log_scale(self, a: torch.Tensor) -> torch.Tensor:
        """log s for the raw scale output a: a itself (exp), or log softplus(a + shift) (STARFlow)."""
        if not self.softplus:
            return a
        u = a + SOFTPLUS_SHIFT
        return torch.where(u < -20.0, u, torch.log(F.softplus(u)))  # log softplus(u) = u - exp(u) + ... for u << 0

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Data -> noise for all patches in parallel. x: (b, t, dim) in model order. Returns (z, logdet (b,))."""
        x = self.permute(x)
        out = self.trunk(x, y)
        out = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)  # shift: patch 0 passes through
        dt = _affine_dtype(x)
        a, b = out.to(dt).chunk(2, dim=-1)  # (b, t, dim) each
        log_s = self.log_scale(a)
        z = (x.to(dt) - b) * torch.exp(-log_s)
        return self.permute(z), -log_s.sum(dim=(1, 2))

    def _guided_params(
        self, out: torch.Tensor, st: _DecodeState, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log s, b) for the target patches from raw trunk outputs (n or 2n rows, t, 2 dim). With guidance the
        second half of the rows is the unconditional branch: a <- a_c + w (a_c - a_u), likewise b."""
        a, b = out.to(st.dtype).chunk(2, dim=-1)
        g = st.guidance
        if g.active:
            w = g.weight
            if g.annealed:  # w_p = w * p / (T - 1) for target patch p (targets live on the data's device)
                w = w * targets.to(st.dtype).view(1, -1, 1) / (self.pos_embed.shape[0] - 1)
            (a_c, a_u), (b_c, b_u) = a.split(st.n), b.split(st.n)
            a = a_c + w * (a_c - a_u) if "a" in g.what else a_c
            b = b_c + w * (b_c - b_u) if "b" in g.what else b_c
        return self.log_scale(a), b

    def _decode_setup(self, z: torch.Tensor, y: torch.Tensor | None, guidance: Guidance, kv_cache: bool):
        dt = _affine_dtype(z)
        x = self.permute(z).to(dt).clone()  # decoded in place, in block order
        n, T, _ = x.shape
        yy, q_scale = y, None
        if guidance.active:
            yy = torch.cat([y, torch.full_like(y, -1)])
            temp = torch.full((n,), 1.0 / guidance.attn_temp)
            q_scale = torch.cat([torch.ones(n), temp]).to(x.device).view(-1, 1, 1, 1)
        caches = None
        if kv_cache:
            m = self.attn_blocks[0].attention
            rows = 2 * n if guidance.active else n
            dtype = self.proj_in.weight.dtype
            caches = [KVCache(rows, m.heads, T, m.head_dim, dtype, x.device) for _ in self.attn_blocks]
        return x, _DecodeState(dtype=dt, n=n, guidance=guidance, y=yy, q_scale=q_scale, caches=caches)

    def _run(self, x_in: torch.Tensor, st: _DecodeState, pos: int) -> torch.Tensor:
        inp = torch.cat([x_in, x_in]) if st.guidance.active else x_in
        return self.trunk(inp.to(self.proj_in.weight.dtype), st.y, st.caches, pos, st.q_scale)

    @torch.no_grad()
    def reverse(
        self, z: torch.Tensor, y: torch.Tensor | None = None, guidance: Guidance = NO_GUIDANCE, kv_cache: bool = True
    ) -> torch.Tensor:
        """Noise -> data, patch by patch. With guidance, a conditional and an unconditional pass run as
        one batch; the unconditional branch attends with temperature `attn_temp` (as in ml-tarflow)."""
        x, st = self._decode_setup(z, y, guidance, kv_cache)
        T = x.shape[1]
        for i in range(T - 1):
            inp = x[:, i : i + 1] if kv_cache else x[:, : i + 1]
            out = self._run(inp, st, i if kv_cache else 0)[:, -1:]
            log_s, b = self._guided_params(out, st, torch.tensor([i + 1], device=x.device))  # patch i + 1
            x[:, i + 1] = x[:, i + 1] * torch.exp(log_s[:, 0]) + b[:, 0]
        return self.permute(x)

    @torch.no_grad()
    def reverse_jacobi(
        self,
        z: torch.Tensor,
        y: torch.Tensor | None = None,
        guidance: Guidance = NO_GUIDANCE,
        tol: float = 1e-4,
        max_iters: int = 0,
        chunk: int = 0,
    ) -> tuple[torch.Tensor, int]:
        """Noise -> data by fixed-point iteration: the patches of a chunk are all updated at once,
        x <- z * s(x_<) + b(x_<), starting from x = z, until max |change| <= tol (or max_iters per chunk);
        chunks in turn (Gauss-Seidel), their prefix in a KV cache. chunk=0: one chunk (plain Jacobi).
        After k iterations the first k patches of a chunk are exact, so a chunk of c patches is exact
        after c iterations (the default cap). Returns (x, iterations summed over chunks)."""
        x, st = self._decode_setup(z, y, guidance, True)
        T = x.shape[1]
        zz = x.clone()
        c = chunk if chunk > 0 else T - 1
        total = 0
        for s in range(1, T, c):  # solve patches [s, e) from inputs [s - 1, e - 1)
            e = min(s + c, T)
            targets = torch.arange(s, e, device=x.device)
            for _ in range(max_iters if max_iters > 0 else e - s):
                log_s, b = self._guided_params(self._run(x[:, s - 1 : e - 1], st, s - 1), st, targets)
                new = zz[:, s:e] * torch.exp(log_s) + b
                delta = float((new - x[:, s:e]).abs().max())
                x[:, s:e] = new
                total += 1
                if delta <= tol:
                    break
        return self.permute(x), total


class TarFlow(nn.Module):
    """The teacher: encode (data -> noise, one parallel pass), decode (noise -> data), log_prob, denoise."""

    def __init__(self, cfg: TarFlowConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.blocks = nn.ModuleList(MetaBlock(cfg, flip=bool(i % 2), layers=n) for i, n in enumerate(cfg.block_layers))
        # prior variance per (patch, channel * p^2), as ml-tarflow's `var`; the prior is N(0, diag(var))
        self.register_buffer("var", torch.ones(cfg.num_patches, cfg.patch_dim))

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

    @property
    def prior_std(self) -> torch.Tensor:
        """Standard deviation of the prior per pixel, (c, H, W): sqrt(var) laid out as an image."""
        return self.unpatchify(self.var.sqrt()[None])[0]

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

    def check_labels(self, y: torch.Tensor | None, n: int, values: bool = True) -> torch.Tensor | None:
        """Labels of n images: shape and dtype, and (values=True) the range [-1, classes), which reads the tensor
        (a host sync on a GPU, a graph break under torch.compile): the training step's forward skips that."""
        if y is None or self.num_classes == 0:
            return None
        y = torch.as_tensor(y)
        if y.shape != (n,) or y.is_floating_point():
            raise NFMError(f"labels must be an int64 tensor of shape ({n},), got {tuple(y.shape)} {y.dtype}")
        if values and ((y < -1) | (y >= self.num_classes)).any():
            raise NFMError(
                f"labels must be in [-1, {self.num_classes - 1}] (-1: no label), got "
                f"min {int(y.min())}, max {int(y.max())}"
            )
        return y.long()

    # ------------------------------------------------------------------ the flow
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The training hot path: encode without reading values (NaN, label range: no host sync). x: (b, c, H, W)."""
        self.check_images(x, finite=False)
        y = self.check_labels(y, x.shape[0], values=False)
        h = self.patchify(x)
        logdet = torch.zeros(x.shape[0], dtype=_affine_dtype(x), device=x.device)
        for block in self.blocks:
            h, ld = block(h, y)
            logdet = logdet + ld
        return self.unpatchify(h), logdet

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Data -> noise in one parallel pass: z (b, c, H, W). `self(x, y)` also returns log|det dz/dx|."""
        self.check_images(x, "encode")
        self.check_labels(y, x.shape[0])
        return self(x, y)[0]

    @torch.no_grad()
    def decode(
        self,
        z: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        guidance: Guidance = NO_GUIDANCE,
        kv_cache: bool = True,
        method: Decoder = "sequential",
        tol: float = 1e-4,
        max_iters: int = 0,
        chunk: int = 0,
        stats: dict | None = None,
    ) -> torch.Tensor:
        """Noise -> data, the exact inverse of `encode`.

        method "sequential": patch by patch with a KV cache (kv_cache=False recomputes the prefix).
        method "jacobi": parallel fixed-point iteration per block to tolerance `tol` (at most `max_iters`
        iterations per chunk; default: the chunk length, which is exact), in chunks of `chunk` patches
        (0: the whole sequence; smaller chunks = Gauss-Seidel-Jacobi). `stats`, a dict, receives the
        iterations per block. `guidance`: see `Guidance`.
        """
        one_of(method, Decoder, "decoder")
        if method == "jacobi" and not tol >= 0:
            raise NFMError(f"jacobi tolerance must be >= 0, got {tol}")
        self.check_images(z, "decode")
        y = self.check_labels(y, z.shape[0])
        if guidance.active:
            if self.num_classes == 0:
                raise NFMError("classifier-free guidance needs a class-conditional teacher; this one has no classes")
            if y is None:
                raise NFMError("classifier-free guidance needs labels y to guide towards")
            if guidance.attn_temp <= 0:
                raise NFMError(f"attn_temp must be > 0, got {guidance.attn_temp}")
        h = self.patchify(z)
        iters = []
        for block in reversed(self.blocks):
            if method == "jacobi":
                h, k = block.reverse_jacobi(h, y, guidance, tol, max_iters, chunk)
                iters.append(k)
            else:
                h = block.reverse(h, y, guidance, kv_cache)
        if stats is not None:
            stats["iterations"] = iters[::-1]  # block order
        return self.unpatchify(h)

    def log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x) in nats, (b,): log N(z; 0, diag(var)) + log|det dz/dx|."""
        self.check_images(x, "log_prob")
        self.check_labels(y, x.shape[0])
        z, logdet = self(x, y)
        var = self.var.to(_affine_dtype(z))
        d = z[0].numel()
        quad = (self.patchify(z).pow(2) / var).flatten(1).sum(1)
        return -0.5 * quad - 0.5 * d * math.log(2 * math.pi) - 0.5 * var.log().sum() + logdet

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
        eps = torch.randn(n, *self.image_shape, generator=generator).to(p.device, p.dtype)
        x = self.decode(eps * (temperature * self.prior_std.to(p.dtype)), y, **decode_kwargs)
        return self.denoise(x, y) if denoise and self.noise_std > 0 else x

    def fingerprint(self) -> str:
        """sha256 of the config and every weight: the teacher's identity in cache keys. Options added since
        the first format (scale, var) enter only when not at their defaults, so older teachers keep theirs."""
        cfg = asdict(self.cfg)
        if cfg["scale"] == "exp":
            del cfg["scale"]
        h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
        for k, v in sorted(self.state_dict().items()):
            if k == "var" and bool((v == 1).all()):
                continue
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]
