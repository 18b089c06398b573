"""Apple's ml-tarflow checkpoints (github.com/apple/ml-tarflow, `transformer_flow.Model`) as teachers.

Their state dict uses the names this project's TarFlow was laid out to match:

    blocks.{i}.proj_in              Linear(C p^2 -> width)
    blocks.{i}.pos_embed            (T, width)
    blocks.{i}.class_embed          (num_classes, 1, width), only with classes
    blocks.{i}.attn_blocks.{j}.attention.{norm, qkv, proj}, .mlp.{norm, main.0, main.2}
    blocks.{i}.proj_out             Linear(width -> 2 C p^2): a, then b (width -> C p^2 without `nvp`: b only)
    blocks.{i}.attn_mask            (T, T) causal mask buffer: dropped, attention is causal by construction
    var                             (T, C p^2) prior variance: sampling decodes eps * sqrt(var)

so the mapping is a renaming of nothing: the tensors load as they are, the mask is dropped and a
volume-preserving (`nvp=False`) output projection gets zero rows for a. Their per-block log-det is
-mean(a) over patches and channels, i.e. ours (-sum(a)) divided by T C p^2; their z is ours.

The architecture comes from the tensor shapes where they tell it (width, blocks, layers, classes,
patches, C p^2, MLP expansion), from the file name `{data}_model_{patch}_{width}_{blocks}_{layers}_{noise}.pth`
and from `--teacher-arch key=value,...` (in_channels, patch_size, img_size, head_dim, noise_std).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from nfm.core.errors import NFMError
from nfm.core.io import load_torch_weights
from nfm.teacher.model import TarFlow, TarFlowConfig

FILENAME = re.compile(r"_model_(\d+)_(\d+)_(\d+)_(\d+)_([0-9.]+?)\.pth?$")
HEAD_DIM = 64  # ml-tarflow's default attention head width
PREFIXES = ("module.", "_orig_mod.")
ARCH_KEYS = (
    "in_channels",
    "img_size",
    "patch_size",
    "width",
    "num_blocks",
    "layers_per_block",
    "head_dim",
    "num_classes",
    "noise_std",
    "expansion",
)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True) of a .pth file -> a flat {name: tensor} (prefixes of DDP / compile removed)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise NFMError(f"ml-tarflow checkpoint not found: {p}")
    obj = load_torch_weights(p, "ml-tarflow checkpoint")  # torch.load(weights_only=True), one-line refusals
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = [k for k in ("model", "state_dict", "ema", "model_ema") if isinstance(obj.get(k), dict)]
        if nested:
            obj = obj[nested[0]]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise NFMError(f"{p} does not hold a state dict of tensors (got {type(obj).__name__})")
    out = {}
    for k, v in obj.items():
        for prefix in PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def arch_from_filename(path: str | Path) -> dict[str, Any]:
    """afhq_model_8_768_8_8_0.07.pth -> patch 8, width 768, 8 blocks x 8 layers, noise 0.07."""
    m = FILENAME.search(Path(path).name)
    if not m:
        return {}
    p, w, nb, nl, eta = m.groups()
    return {
        "patch_size": int(p),
        "width": int(w),
        "num_blocks": int(nb),
        "layers_per_block": int(nl),
        "noise_std": float(eta.rstrip(".")),
    }


def infer_arch(sd: dict[str, torch.Tensor], given: dict[str, Any], where: str) -> dict[str, Any]:
    """Architecture numbers from the tensor shapes, checked against what the user / file name gives."""
    if "blocks.0.proj_in.weight" not in sd or "blocks.0.pos_embed" not in sd:
        raise NFMError(
            f"{where} is not an ml-tarflow state dict: no blocks.0.proj_in.weight / blocks.0.pos_embed "
            f"(first keys: {sorted(sd)[:4]})"
        )
    unknown = set(given) - set(ARCH_KEYS)
    if unknown:
        raise NFMError(f"--teacher-arch: unknown keys {sorted(unknown)}; known: {', '.join(ARCH_KEYS)}")
    width, patch_dim = sd["blocks.0.proj_in.weight"].shape
    T = sd["blocks.0.pos_embed"].shape[0]
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})
    if blocks != list(range(len(blocks))):
        raise NFMError(f"{where}: block indices {blocks} are not 0..{len(blocks) - 1}")
    layers = Counter()
    for k in sd:
        m = re.match(r"blocks\.(\d+)\.attn_blocks\.(\d+)\.attention\.qkv\.weight$", k)
        if m:
            layers[int(m.group(1))] += 1
    per_block = tuple(layers[i] for i in blocks)
    ce = sd.get("blocks.0.class_embed")
    inferred: dict[str, Any] = {
        "width": int(width),
        "num_blocks": len(blocks),
        "layers_per_block": per_block[0] if len(set(per_block)) == 1 else per_block,
        "num_classes": int(ce.shape[0]) if ce is not None else 0,
        "expansion": int(sd["blocks.0.attn_blocks.0.mlp.main.0.weight"].shape[0]) // int(width),
    }
    arch = {**inferred}
    for k, v in given.items():
        if k in inferred and v != inferred[k] and not (k == "layers_per_block" and (v,) * len(blocks) == per_block):
            raise NFMError(f"{where}: {k}={v} was given but the weights say {k}={inferred[k]}")
        arch.setdefault(k, v)
    arch["head_dim"] = int(given.get("head_dim", HEAD_DIM))
    # patch size and channels: C p^2 = patch_dim; T = (img_size / p)^2
    p, c = given.get("patch_size"), given.get("in_channels")
    if p is None and c is not None and patch_dim % c == 0 and math.isqrt(patch_dim // c) ** 2 == patch_dim // c:
        p = math.isqrt(patch_dim // c)
    if p is None:
        for cand in (3, 1):  # ml-tarflow's data sets are RGB
            if patch_dim % cand == 0 and math.isqrt(patch_dim // cand) ** 2 == patch_dim // cand:
                c, p = cand, math.isqrt(patch_dim // cand)
                break
    if p is None or patch_dim % (p * p):
        raise NFMError(
            f"{where}: cannot tell the patch size from C*p^2 = {patch_dim}; "
            "pass --teacher-arch patch_size=P,in_channels=C"
        )
    c = c if c is not None else patch_dim // (p * p)
    if c * p * p != patch_dim:
        raise NFMError(f"{where}: in_channels={c} x patch_size={p}^2 != {patch_dim} features per patch in the weights")
    side = math.isqrt(T)
    if side * side != T:
        raise NFMError(f"{where}: {T} patches do not form a square grid")
    img = given.get("img_size", side * p)
    if img != side * p:
        raise NFMError(f"{where}: img_size={img} but {T} patches of {p}x{p} make {side * p}x{side * p} images")
    arch.update(patch_size=int(p), in_channels=int(c), img_size=int(img))
    if "noise_std" not in arch:
        raise NFMError(
            f"{where}: the checkpoint does not record its training noise eta; pass --teacher-arch noise_std=ETA "
            "(ml-tarflow names its files {data}_model_{patch}_{width}_{blocks}_{layers}_{eta}.pth)"
        )
    return arch


def map_state_dict(sd: dict[str, torch.Tensor], model: TarFlow, where: str) -> dict[str, torch.Tensor]:
    """ml-tarflow names and tensors -> ours (float32): drop the masks, pad a volume-preserving proj_out."""
    ours = model.state_dict()
    out = {}
    for k, v in sd.items():
        if k.endswith(".attn_mask"):
            T = model.cfg.num_patches
            if tuple(v.shape) != (T, T):
                raise NFMError(f"{where}: {k} has shape {tuple(v.shape)}, expected ({T}, {T})")
            continue
        if k not in ours:
            raise NFMError(f"{where}: unexpected tensor {k!r} {tuple(v.shape)}: not part of an ml-tarflow Model")
        v = v.float()
        if k.endswith("proj_out.weight") or k.endswith("proj_out.bias"):
            if v.shape[0] * 2 == ours[k].shape[0]:  # nvp=False: b only, a = 0
                v = torch.cat([torch.zeros_like(v), v])
        if tuple(v.shape) != tuple(ours[k].shape):
            raise NFMError(f"{where}: {k} has shape {tuple(v.shape)}, the architecture needs {tuple(ours[k].shape)}")
        out[k] = v
    missing = sorted(set(ours) - set(out) - {"var"})
    if missing:
        raise NFMError(f"{where}: missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    out.setdefault("var", torch.ones_like(ours["var"]))
    return out


def load_ml_tarflow(path: str | Path, arch: dict[str, Any] | None = None) -> tuple[TarFlow, dict[str, Any]]:
    """An ml-tarflow .pth -> (our TarFlow with its exact weights, the architecture used)."""
    where = str(path)
    sd = read_state_dict(path)
    given = {**arch_from_filename(path), **(arch or {})}
    a = infer_arch(sd, given, where)
    cfg = TarFlowConfig(**{k: a[k] for k in ARCH_KEYS})
    model = TarFlow(cfg)
    model.load_state_dict(map_state_dict(sd, model, where))
    return model.eval(), a
