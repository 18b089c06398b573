"""Semidiscrete optimal transport between N(0, I) and a finite set of images (SD-FM's coupling).

The source is continuous (z ~ N(0, I) in D dimensions), the target discrete (images x_j with masses b_j,
b_j = 1/N by default). For weights g (one per image) the map

    T_g(z) = argmin_j |z - x_j|^2 - g_j           (a Laguerre / power-diagram cell per image)

is the optimal transport map exactly when every cell holds its mass: P(T_g(z) = j) = b_j. The g that do
this maximise the concave semi-dual

    F(g) = E_z[ min_j |z - x_j|^2 - g_j ] + sum_j b_j g_j,      dF/dg_j = b_j - P(T_g(z) = j),

so g is fitted by stochastic ascent (Genevay et al. 2016; SD-FM, Mousavi-Hosseini et al. 2025): at step k a
fresh batch of B noise draws, seeded by (seed, group, k), is assigned; each g_j moves by
lr_k * (1 - count_j / (B b_j)) (the gradient in units of b_j), lr_k = lr / sqrt(1 + k / decay), and the
fitted g is the running average of the iterates over the last half of the steps (Polyak averaging: the
iterates themselves jitter by about lr_k). F is invariant to adding a constant to g; g is centred.

Labelled data are fitted per class (one independent problem per class, b_j = 1/N_c within class c), as the
minibatch-OT baseline pairs within each class: a class-conditional sampler starts every class from N(0, I).

The assignment needs argmax_j 2 z.x_j + g_j - |x_j|^2 over N images: one (B x D) @ (D x N) product, in
chunks of images, on the device of the images. The fitted weights are a small artifact with their own
content-addressed key, beside the pair caches (CACHE_ROOT/../sdot/KEY/), reused by every student of the
same data; an interrupted fit resumes from its last saved state and ends bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from nfm.core.config import AtLeast1, Positive
from nfm.core.distributed import process_state
from nfm.core.errors import NFMError
from nfm.core.io import load_state, load_tensors, read_json, save_state, save_tensors, sha256_file, write_json
from nfm.core.rundir import progress
from nfm.core.seeding import derive_seed
from nfm.pairs.lookup import default_cache_root

FORMAT_VERSION = 1
WEIGHTS_NAME = "potentials.safetensors"
META_NAME = "sdot.json"
PARTIAL_NAME = "partial.safetensors"


@dataclass(frozen=True)
class SDOTConfig:
    steps: AtLeast1 = 1000  # ascent steps per problem (per class for labelled data)
    batch_size: AtLeast1 = 1024  # noise draws per step
    lr: Positive = 1.0  # initial step on g, in units of the cost |z - x|^2
    decay: Positive = 100.0  # lr_k = lr / sqrt(1 + k / decay)
    check: AtLeast1 = 64  # noise draws per image to measure the fitted shares
    seed: int = 0
    per_class: bool = True  # labelled data: one problem per class
    save_every: AtLeast1 = 500  # steps between saved states (resume)
    chunk: AtLeast1 = 16384  # images per matmul chunk of the assignment


def assign(z: torch.Tensor, x: torch.Tensor, offset: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """argmin_j |z_i - x_j|^2 - g_j for rows z (B, D) and images x (N, D), given offset_j = |x_j|^2 - g_j:
    argmax_j 2 z.x_j - offset_j, computed chunk by chunk of images (memory B x chunk)."""
    best_val = torch.full((z.shape[0],), -math.inf, dtype=z.dtype, device=z.device)
    best_idx = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    for a in range(0, x.shape[0], chunk):
        score = torch.addmm(-offset[a : a + chunk].unsqueeze(0), z, x[a : a + chunk].T, alpha=2.0)
        val, idx = score.max(dim=1)
        better = val > best_val
        best_val = torch.where(better, val, best_val)
        best_idx = torch.where(better, idx + a, best_idx)
    return best_idx


@dataclass
class _Problem:
    """One semidiscrete problem: images (n, D) with masses b, and the state of its ascent."""

    x: torch.Tensor
    b: torch.Tensor
    g: torch.Tensor  # current iterate
    avg: torch.Tensor  # running average of the iterates from step `steps // 2` on
    step: int = 0

    @property
    def sq(self) -> torch.Tensor:
        return self.x.pow(2).sum(1)


def _noise(seed: int, group: int | str, step: int, n: int, dim: int, dtype, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(derive_seed(seed, "sdot", group, step))
    return torch.randn(n, dim, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def ascend(p: _Problem, cfg: SDOTConfig, group: int, until: int, bar=None) -> None:
    """Run the ascent of problem p from its current step to step `until` (exclusive)."""
    n, dim = p.x.shape
    start_avg = cfg.steps // 2
    sq = p.sq
    while p.step < until:
        k = p.step
        z = _noise(cfg.seed, group, k, cfg.batch_size, dim, p.x.dtype, p.x.device)
        idx = assign(z, p.x, sq - p.g, cfg.chunk)
        counts = torch.bincount(idx, minlength=n).to(p.g.dtype)
        lr = cfg.lr / math.sqrt(1 + k / cfg.decay)
        p.g += lr * (1 - counts / (cfg.batch_size * p.b))
        p.g -= p.g.mean()
        if k >= start_avg:
            m = k - start_avg  # iterates averaged so far
            p.avg += (p.g - p.avg) / (m + 1)
        p.step += 1
        if bar is not None:
            bar.update(1)


def shares(x: torch.Tensor, g: torch.Tensor, draws: int, seed: int, group: int, chunk: int = 16384) -> torch.Tensor:
    """The fraction of `draws` fresh noise draws (seeded apart from the fit's) each image's cell receives."""
    n, dim = x.shape
    counts = torch.zeros(n, dtype=torch.float64)
    sq = x.pow(2).sum(1)
    for i, a in enumerate(range(0, draws, 8192)):
        z = _noise(seed, f"check-{group}", i, min(8192, draws - a), dim, x.dtype, x.device)
        counts += torch.bincount(assign(z, x, sq - g.to(x.dtype), chunk), minlength=n).double().cpu()
    return counts / draws


def share_stats(share: torch.Tensor, floor: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """How far the measured shares are from the masses b: max / min of share / b, the fraction of empty cells
    and the total-variation distance; the same figures for `floor`, the shares an exactly fitted assignment
    shows with the same number of draws (multinomial sampling noise alone): the best these figures can be."""

    def stats(s: torch.Tensor) -> dict[str, float]:
        r = s / b
        return {"max_over_mass": float(r.max()), "min_over_mass": float(r.min()),
                "empty": float((s == 0).double().mean()), "tv": float(0.5 * (s - b).abs().sum())}  # fmt: skip

    return {**stats(share), **{f"floor_{k}": v for k, v in stats(floor).items()}}


def exact_shares(b: torch.Tensor, draws: int, seed: int) -> torch.Tensor:
    """Shares of `draws` draws from the masses b themselves: what an exact fit measures at that many draws."""
    g = torch.Generator().manual_seed(derive_seed(seed, "floor"))
    pick = torch.multinomial(b.double().cpu(), draws, replacement=True, generator=g)
    return torch.bincount(pick, minlength=len(b)).double() / draws


# ----------------------------------------------------------------------------- the artifact


def sdot_key(data_fingerprint: str, num_images: int, cfg: SDOTConfig, labelled: bool) -> tuple[str, dict[str, Any]]:
    fields = {
        "format_version": FORMAT_VERSION,
        "data": data_fingerprint,
        "rows": num_images,
        "per_class": cfg.per_class and labelled,
        **{k: v for k, v in asdict(cfg).items() if k not in ("per_class", "save_every", "chunk", "check")},
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20], fields


def class_groups(n: int, labels: torch.Tensor | None) -> list[torch.Tensor]:
    """Row indices (on the CPU) of each class, sorted by class; all n rows in one group without labels. One OT
    problem per group: the semidiscrete fit, and the minibatch and Schrodinger-bridge couplings."""
    if labels is None:
        return [torch.arange(n)]
    labels = labels.cpu()
    return [(labels == c).nonzero().flatten() for c in torch.unique(labels)]


def fit_sdot(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    cfg: SDOTConfig,
    directory: Path,
    *,
    key_fields: dict[str, Any] | None = None,
    masses: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    log=print,
) -> dict[str, Any]:
    """Fit (or resume, or reuse) the weights of `images` (N, ...) into `directory`; returns the metadata
    (sdot.json). `masses` (N,) sums to one over each group (default uniform within each group)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory.parent / f".{directory.name}.lock")):
        if (directory / META_NAME).is_file():  # fitted: load_sdot checks the weights where they are used
            return read_meta(directory)
        return _fit_locked(images, labels, cfg, directory, key_fields or {}, masses, device, dtype, log)


def _fit_locked(images, labels, cfg, directory, key_fields, masses, device, dtype, log) -> dict[str, Any]:
    n = images.shape[0]
    x_all = images.reshape(n, -1).to(device=device, dtype=dtype)
    if not torch.isfinite(x_all).all():
        raise NFMError("semidiscrete OT: the images hold NaN/Inf; clean the data set")
    groups = class_groups(n, labels if cfg.per_class else None)
    problems = []
    for idx in groups:
        b = masses[idx].double() if masses is not None else torch.full((len(idx),), 1.0 / len(idx))
        problems.append(
            _Problem(
                x_all[idx.to(x_all.device)],
                b.to(device, torch.float64).to(dtype),
                torch.zeros(len(idx), dtype=dtype, device=device),
                torch.zeros(len(idx), dtype=dtype, device=device),
            )  # fmt: skip
        )
    partial = directory / PARTIAL_NAME
    if partial.is_file():  # resume: every problem's iterate, average and step, if the saved state is whole
        try:
            steps = _load_partial(partial, problems, cfg)
            log(f"semidiscrete OT: resuming at steps {steps}")
        except NFMError as e:
            log(f"semidiscrete OT: {e}; fitting from the start (the result is the same, only slower)")
            for p in problems:
                p.g.zero_()
                p.avg.zero_()
                p.step = 0
    t0 = time.perf_counter()
    bar = progress(cfg.steps * len(problems), "sd-ot fit", "step", initial=sum(p.step for p in problems))
    for i, p in enumerate(problems):
        while p.step < cfg.steps:
            ascend(p, cfg, i, min(cfg.steps, (p.step // cfg.save_every + 1) * cfg.save_every), bar)
            _save_partial(partial, problems)
    bar.close()
    fit_seconds = time.perf_counter() - t0
    g = torch.zeros(n, dtype=torch.float64)
    share, floor, mass = (torch.zeros(n, dtype=torch.float64) for _ in range(3))
    draws = 0
    t1 = time.perf_counter()
    for i, (idx, p) in enumerate(zip(groups, problems)):  # every figure relative to its group's mass
        g[idx] = p.avg.double().cpu()
        d = cfg.check * len(idx)
        b = p.b.double().cpu()
        share[idx] = shares(p.x, p.avg, d, cfg.seed, i, cfg.chunk) / len(groups)
        floor[idx] = exact_shares(b, d, derive_seed(cfg.seed, i)) / len(groups)
        mass[idx] = b / len(groups)
        draws += d
    stats = share_stats(share, floor, mass)
    meta = {
        "kind": "sdot",
        "format_version": FORMAT_VERSION,
        "key": directory.name,
        "key_fields": key_fields,
        "config": asdict(cfg),
        "rows": n,
        "groups": len(groups),
        "per_class": len(groups) > 1,
        "fit_seconds": round(fit_seconds, 2),
        "check_seconds": round(time.perf_counter() - t1, 2),
        "check_draws": draws,
        "shares": stats,
    }
    save_tensors(directory / WEIGHTS_NAME, {"g": g, "share": share}, metadata={"format": "nfm-sdot"})
    meta["sha256"] = sha256_file(directory / WEIGHTS_NAME)
    write_json(directory / META_NAME, meta)  # last: its presence marks the artifact complete
    partial.unlink(missing_ok=True)
    log(
        f"semidiscrete OT fitted in {fit_seconds:.1f}s: share / mass max {stats['max_over_mass']:.2f}, "
        f"min {stats['min_over_mass']:.2f}, TV {stats['tv']:.4f} (exact fit at {draws} draws: max "
        f"{stats['floor_max_over_mass']:.2f}, min {stats['floor_min_over_mass']:.2f}, TV {stats['floor_tv']:.4f})"
    )
    return meta


def _save_partial(path: Path, problems: list[_Problem]) -> None:
    state = {f"g{i}": p.g.cpu() for i, p in enumerate(problems)}
    state.update({f"avg{i}": p.avg.cpu() for i, p in enumerate(problems)})
    state["steps"] = torch.tensor([p.step for p in problems])
    save_state(path, state, "nfm-sdot-partial")


def _load_partial(path: Path, problems: list[_Problem], cfg: SDOTConfig) -> list[int]:
    """Restore every problem from a saved state, all or nothing: its checksum, names, shapes, finite values and
    steps in [0, cfg.steps] are checked before anything is copied. Returns the steps."""
    state = load_state(path)
    want = {f"{k}{i}": (len(p.b),) for i, p in enumerate(problems) for k in ("g", "avg")}
    want["steps"] = (len(problems),)
    if {k: tuple(v.shape) for k, v in state.items()} != want:
        raise NFMError(f"its saved state {path.name} is of another problem (other tensors or shapes)")
    steps = state["steps"].tolist()
    if not all(torch.isfinite(v).all() for v in state.values()) or not all(0 <= s <= cfg.steps for s in steps):
        raise NFMError(f"its saved state {path.name} holds NaN/Inf or steps outside [0, {cfg.steps}]")
    for i, p in enumerate(problems):
        p.g.copy_(state[f"g{i}"])
        p.avg.copy_(state[f"avg{i}"])
        p.step = int(steps[i])
    return steps


def potential_bound(cfg: SDOTConfig, rows: int) -> float:
    """The largest |g_j| the ascent can reach: each step moves g_j by lr_k (1 - count_j / (B b_j)), at most
    lr_k / b_j <= lr_k N in size (b_j >= 1/N for uniform masses), centring at most doubles it, and the average
    of iterates stays within their range. So |g| <= 2 N sum_k lr_k."""
    return 2.0 * rows * sum(cfg.lr / math.sqrt(1 + k / cfg.decay) for k in range(cfg.steps))


def read_meta(directory: Path) -> dict[str, Any]:
    """sdot.json of a fitted artifact, checked for the fields a reader uses (type and value, not only presence)."""
    meta = read_json(Path(directory) / META_NAME, "semidiscrete OT metadata")
    bad = None
    if not isinstance(meta, dict) or meta.get("kind") != "sdot":
        bad = "it is not the metadata of a semidiscrete OT fit"
    elif not isinstance(meta.get("rows"), int) or isinstance(meta.get("rows"), bool) or meta["rows"] < 1:
        bad = f"rows is {meta.get('rows')!r}"
    elif not isinstance(meta.get("per_class"), bool) or not isinstance(meta.get("sha256"), str):
        bad = "per_class or sha256 is missing or of the wrong type"
    if bad:
        raise NFMError(
            f"semidiscrete OT metadata {Path(directory) / META_NAME} is corrupt ({bad}); delete {directory} and "
            "the weights are fitted again"
        )
    return meta


def load_sdot(directory: Path, cfg: SDOTConfig | None = None, rows: int | None = None) -> tuple[torch.Tensor, dict]:
    """(g (N,) float64, metadata) of a fitted artifact: its metadata checked, its weights against their checksum,
    then for what a coupling needs: one finite weight per image (`rows`, if given), no larger than the ascent
    under `cfg` can make them (potential_bound)."""
    directory = Path(directory)
    meta = read_meta(directory)
    path = directory / WEIGHTS_NAME
    fix = f"delete {directory} and they are fitted again"
    if not path.is_file() or sha256_file(path) != meta["sha256"]:
        raise NFMError(f"semidiscrete OT weights {path} are missing or do not match their checksum; {fix}")
    g = load_tensors(path, "semidiscrete OT weights").get("g")
    n = rows if rows is not None else meta["rows"]
    if g is None or g.dim() != 1 or len(g) != n or meta["rows"] != n:
        got = None if g is None else tuple(g.shape)
        raise NFMError(f"semidiscrete OT weights {path} hold {got} weights for {n} images; {fix}")
    if not torch.isfinite(g).all():
        raise NFMError(f"semidiscrete OT weights {path} hold NaN/Inf; {fix}")
    if cfg is not None and float(g.abs().max()) > potential_bound(cfg, n):
        raise NFMError(
            f"semidiscrete OT weights {path} reach {float(g.abs().max()):.3g}, more than a fit of these settings "
            f"can ({potential_bound(cfg, n):.3g}); {fix}"
        )
    return g.double(), meta


# ----------------------------------------------------------------------------- the artifact's place in the cache root


def sdot_root(cache_root: Path | None = None) -> Path:
    """Where semidiscrete OT weights live: beside the pair caches (CACHE_ROOT/../sdot)."""
    return Path(cache_root or default_cache_root()).parent / "sdot"


def sdot_dir(data, cfg: SDOTConfig, cache_root: Path | None = None) -> tuple[Path, dict]:
    """(directory, key fields) of the semidiscrete OT weights of `data` under `cfg`."""
    key, fields = sdot_key(data.fingerprint, len(data), cfg, data.num_classes > 0)
    return sdot_root(cache_root) / key, fields


def fit_sdot_for(data, cfg: SDOTConfig, cache_root: Path | None = None, device=None, log=print):
    """(g, metadata) of the semidiscrete OT weights of `data` under `cfg`: fitted once, then reused."""
    d, fields = sdot_dir(data, cfg, cache_root)
    images, labels = data.tensors()
    meta = fit_sdot(
        images, labels if data.num_classes else None, cfg, d, key_fields=fields,
        device=device or process_state().device, log=log,
    )  # fmt: skip
    return load_sdot(d, cfg, len(data))[0], meta
