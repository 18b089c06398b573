"""The prior fitted to a pair cache's noise: an artifact of the cache, fitted once and reused.

    PRIORS_ROOT/KEY/            PRIORS_ROOT = CACHE_ROOT/../priors, CACHE_ROOT the folder holding the cache
      prior.safetensors         full: mean (K+1, D), chol (K+1, D, D); low-rank: mean, sqrt_psi (K+1, D), basis
                                (K+1, D, r), s (K+1, r); float64, and shape   (core.prior)
      prior.json                kind, model, key, cache_key, config, sha256 of prior.safetensors, each
                                component's statistics (rows, mean norm, variance and eigenvalue range, KL to N(0, I))
      partial.safetensors       while fitting: the sums of the shards read so far (checksummed)

The model: `full` (mean + OAS-shrunk covariance a class), `lowrank` (top `rank` directions + a diagonal, for
images whose D x D matrices a class would not fit in memory), or `auto` (full where it fits in
core.prior.MAX_FULL_BYTES, else lowrank; resolved against the cache before anything else). KEY hashes
the cache's key and the resolved settings, so a cache has one artifact per setting. The fit streams the shards in
index order (twice for lowrank: a sketch pass, then a projection pass), each checked against its checksum as it is
read, adding every pair's noise to the sums of its class; after each shard the sums are saved, so a killed fit
resumes where it stopped and ends with the same bits as an uninterrupted one. prior.json is written last: its
presence marks the artifact complete. A lock makes two processes fitting the same prior wait for one another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from nfm.core.errors import NFMError
from nfm.core.io import load_state, read_json, save_state, sha256_file, write_json
from nfm.core.prior import (
    FittedPrior,
    LowRankPrior,
    Moments,
    Prior,
    Sketch,
    describe,
    full_fits,
    load_prior_file,
)
from nfm.core.rundir import progress
from nfm.pairs.format import read_index
from nfm.pairs.reader import PairCache

PRIOR_VERSION = 1
TENSORS_NAME = "prior.safetensors"
META_NAME = "prior.json"
PARTIAL_NAME = "partial.safetensors"


@dataclass(frozen=True)
class PriorConfig:
    per_class: bool = True  # one Gaussian per class (and one pooled); false: the pooled one only
    model: str = "auto"  # full | lowrank | auto: full where its D x D matrices fit in memory, else lowrank
    rank: int = 64  # lowrank: the number of principal directions kept (the rest is diagonal)


MODELS = ("auto", "full", "lowrank")
MODEL_NAMES = {"full": "gaussian-oas", "lowrank": "gaussian-lowrank"}


def resolve(cfg: PriorConfig, shape: tuple[int, ...], num_classes: int) -> PriorConfig:
    """`cfg` with its model decided for samples of `shape` and `num_classes` classes (auto -> full | lowrank)."""
    if cfg.model not in MODELS:
        raise NFMError(f"prior model {cfg.model!r} is not one of {', '.join(MODELS)}")
    if cfg.model == "lowrank" and cfg.rank < 1:
        raise NFMError(f"a low-rank prior needs rank >= 1, got {cfg.rank}")
    if cfg.model != "auto":
        return cfg
    groups = num_classes + 1 if cfg.per_class and num_classes else 1
    return replace(cfg, model="full" if full_fits(groups, int(torch.Size(shape).numel())) else "lowrank")


def priors_root(cache_root: Path) -> Path:
    return Path(cache_root).parent / "priors"


def prior_key(cache_key: str, cfg: PriorConfig) -> str:
    """The artifact's key: the cache's key and the resolved settings (a full fit's fields are those it always had)."""
    if cfg.model not in MODEL_NAMES:
        raise NFMError(f"prior model {cfg.model!r} must be resolved (full or lowrank) before it has a key")
    fields = {"version": PRIOR_VERSION, "kind": MODEL_NAMES[cfg.model], "cache": cache_key, "per_class": cfg.per_class}
    if cfg.model == "lowrank":
        fields["rank"] = cfg.rank
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def prior_dir(cache: PairCache, cfg: PriorConfig) -> Path:
    return priors_root(cache.dir.parent) / prior_key(cache.key, resolve(cfg, cache.image_shape, cache.num_classes))


def default_prior_dir(cache_dir: Path) -> Path:
    """Where the default prior of the cache at `cache_dir` is (fitted or not), from its index alone."""
    index = read_index(cache_dir)
    shape, classes = tuple(index["shapes"]["data"]), int(index["data"].get("num_classes", 0))
    return priors_root(cache_dir.parent) / prior_key(cache_dir.name, resolve(PriorConfig(), shape, classes))


def fit_prior(cache: PairCache, cfg: PriorConfig, log=print) -> tuple[Prior, dict[str, Any]]:
    """(prior, prior.json) of `cache` under `cfg`: fitted once (resuming a killed fit), then loaded and checked."""
    cfg = resolve(cfg, cache.image_shape, cache.num_classes)
    d = prior_dir(cache, cfg)
    d.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(d.parent / f".{d.name}.lock")):
        if not (d / META_NAME).is_file():
            _fit_locked(cache, cfg, d, log)
    return load_prior(d, cache.key)


def _groups(cache: PairCache, cfg: PriorConfig) -> int:
    return cache.num_classes + 1 if cfg.per_class and cache.num_classes else 1


def read_noise(cache: PairCache, i: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shard i's noise (float64) and labels, the shard checked against its checksum before any row is used
    (`groups` > 1: labels must be below groups - 1)."""
    sf = cache.shard(i)
    cols = {"noise": sf.empty("noise"), "label": sf.empty("label")}
    sf.read_verified(cache.shards[i], cols)
    noise = cols["noise"].double()
    if not torch.isfinite(noise).all():
        raise NFMError(f"pair shard {sf.path} holds NaN/Inf noise; run `nfm pairs verify {cache.key}`")
    label = cols["label"].long()
    if groups > 1 and int(label.max()) >= groups - 1:
        raise NFMError(f"pair shard {sf.path} holds label {int(label.max())} of {groups - 1} classes; rebuild it")
    return noise, label


def _fit_locked(cache: PairCache, cfg: PriorConfig, d: Path, log) -> None:
    groups, dim, shards = _groups(cache, cfg), int(torch.Size(cache.image_shape).numel()), len(cache.shards)
    lowrank = cfg.model == "lowrank"

    def fresh() -> Moments | Sketch:
        return Sketch.zeros(groups, dim, cfg.rank) if lowrank else Moments.zeros(groups, dim)

    sums, stage, done = fresh(), 0, 0
    partial = d / PARTIAL_NAME
    if partial.is_file():
        try:
            stage, done = _restore(partial, sums, shards)
            log(f"prior fit: resuming after {done} of {shards} shards" + (f" (pass {stage + 1})" if lowrank else ""))
        except NFMError as e:
            log(f"prior fit: {e}; fitting from the start (the result is the same, only slower)")
            sums, stage, done = fresh(), 0, 0
    passes = 2 if lowrank else 1
    for p in range(stage, passes):
        if p == 1 and int(sums.stage) == 0:
            sums.start_second_pass()
        name = f"prior fit, pass {p + 1} of {passes}" if lowrank else "prior fit"
        bar = progress(shards, name, "shard", initial=done)
        for i in range(done, shards):
            noise, label = read_noise(cache, i, groups)
            pooled = torch.full_like(label, groups - 1)
            if lowrank and groups > 1:  # each labelled row to its class and to the pooled component
                sums.add(noise[label >= 0], label[label >= 0])
                sums.add(noise, pooled)
            else:  # the full fit pools its classes after the pass (below)
                sums.add(noise, torch.where(label >= 0, label, pooled) if groups > 1 else pooled)
            d.mkdir(parents=True, exist_ok=True)
            state = {**sums.state(), "shards": torch.tensor(i + 1)}
            if lowrank and p == 0 and i + 1 == shards:  # the first pass complete: the second starts from nothing
                sums.start_second_pass()
                state = {**sums.state(), "shards": torch.tensor(0)}
            save_state(partial, state, "nfm-prior-partial")
            bar.update(1)
        bar.close()
        done = 0
    if lowrank:
        prior, stats = LowRankPrior.from_sketch(sums, cache.image_shape, cfg.rank)
    else:
        if groups > 1:  # the pooled component: every row, labelled or not
            sums.pool_last()
        prior, stats = FittedPrior.from_moments(sums, cache.image_shape)
    prior.save(d / TENSORS_NAME)
    meta = {
        "kind": "prior",
        "model": MODEL_NAMES[cfg.model],
        "version": PRIOR_VERSION,
        "key": d.name,
        "cache_key": cache.key,
        "config": asdict(cfg),
        "shape": list(cache.image_shape),
        "classes": groups - 1,
        "sha256": sha256_file(d / TENSORS_NAME),
        "components": stats,
    }
    write_json(d / META_NAME, meta)  # last: the artifact is complete
    partial.unlink(missing_ok=True)
    log(f"prior fitted to pair cache {cache.key}: {describe(stats)}")


def _restore(path: Path, sums: Moments | Sketch, shards: int) -> tuple[int, int]:
    """The sums after the saved pass and number of shards, all or nothing; returns (pass, shards)."""
    state = load_state(path)
    want = {k: tuple(v.shape) for k, v in sums.state().items()} | {"shards": ()}
    if {k: tuple(v.shape) for k, v in state.items()} != want:
        raise NFMError(f"its saved state {path.name} is of another fit (other tensors or shapes)")
    done, stage = int(state["shards"]), int(state.get("stage", 0))
    if not 0 <= done <= shards or stage not in (0, 1) or not all(torch.isfinite(v).all() for v in state.values()):
        raise NFMError(f"its saved state {path.name} holds NaN/Inf or {done} shards of {shards}")
    sums.restore(state)
    return stage, done


def load_prior(d: Path, cache_key: str | None = None) -> tuple[Prior, dict[str, Any]]:
    """A fitted prior, refused in one line when its files do not match their checksum or it is of another cache."""
    meta = read_json(d / META_NAME, "prior metadata")
    fix = f"delete {d} and it is fitted again"
    if not isinstance(meta, dict) or meta.get("kind") != "prior" or not isinstance(meta.get("sha256"), str):
        raise NFMError(f"{d / META_NAME} is not the metadata of a fitted prior; {fix}")
    if cache_key is not None and meta.get("cache_key") != cache_key:
        raise NFMError(f"the prior in {d} was fitted to pair cache {meta.get('cache_key')}, not {cache_key}; {fix}")
    path = d / TENSORS_NAME
    if not path.is_file() or sha256_file(path) != meta["sha256"]:
        raise NFMError(f"fitted prior {path} is missing or does not match its checksum; {fix}")
    return load_prior_file(path), meta


def teacher_prior(cache: PairCache, teacher_fingerprint: str | None = None, log=print) -> Prior:
    """The prior fitted to a teacher's pair cache, scaled into that teacher's latent units (noise = z / (prior_std
    sigma_f): times sigma_f here, the caller multiplies by the teacher's prior_std). With `teacher_fingerprint`,
    a cache of another teacher is refused: its noise is another latent space."""
    if cache.kind != "teacher":
        raise NFMError(f"pair cache {cache.key} holds {cache.kind} pairs: a teacher's prior is fitted to its own pairs")
    built_by = (cache.index.get("key_fields") or {}).get("teacher")
    if teacher_fingerprint is not None and built_by != teacher_fingerprint:
        raise NFMError(
            f"pair cache {cache.key} was built by teacher {built_by}, not this one ({teacher_fingerprint}): name a "
            "cache of this teacher (`nfm pairs ls` lists each cache's teacher)"
        )
    prior, _ = fit_prior(cache, PriorConfig(), log=log)
    return prior.scaled(cache.sigma_f)
