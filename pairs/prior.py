"""The prior fitted to a pair cache's noise: an artifact of the cache, fitted once and reused.

    PRIORS_ROOT/KEY/            PRIORS_ROOT = CACHE_ROOT/../priors, CACHE_ROOT the folder holding the cache
      prior.safetensors         mean (K+1, D), chol (K+1, D, D) float64, shape   (pipeline.core.prior)
      prior.json                kind, key, cache_key, config, sha256 of prior.safetensors, each component's
                                statistics (rows, mean norm, variance and eigenvalue range, KL to N(0, I))
      partial.safetensors       while fitting: the moments of the shards read so far (checksummed)

KEY hashes the cache's key and the fit's settings, so a cache has one artifact per setting. The fit streams
the shards in index order, each checked against its checksum as it is read, adding every pair's noise to
the moments of its class; after each shard the moments are saved, so a killed fit resumes where it stopped
and ends with the same bits as an uninterrupted one. prior.json is written last: its presence marks the
artifact complete. A lock makes two processes fitting the same prior wait for one another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from nfm.pairs.reader import PairCache
from nfm.pipeline.core.errors import NFMError
from nfm.pipeline.core.io import load_state, read_json, save_state, sha256_file, write_json
from nfm.pipeline.core.prior import FittedPrior, Moments, describe
from nfm.pipeline.core.rundir import progress

PRIOR_VERSION = 1
TENSORS_NAME = "prior.safetensors"
META_NAME = "prior.json"
PARTIAL_NAME = "partial.safetensors"


@dataclass(frozen=True)
class PriorConfig:
    per_class: bool = True  # one Gaussian per class (and one pooled); false: the pooled one only


def priors_root(cache_root: Path) -> Path:
    return Path(cache_root).parent / "priors"


def prior_key(cache_key: str, cfg: PriorConfig) -> str:
    fields = {"version": PRIOR_VERSION, "kind": "gaussian-oas", "cache": cache_key, **asdict(cfg)}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def prior_dir(cache: PairCache, cfg: PriorConfig) -> Path:
    return priors_root(cache.dir.parent) / prior_key(cache.key, cfg)


def fit_prior(cache: PairCache, cfg: PriorConfig, log=print) -> tuple[FittedPrior, dict[str, Any]]:
    """(prior, prior.json) of `cache` under `cfg`: fitted once (resuming a killed fit), then loaded and checked."""
    d = prior_dir(cache, cfg)
    d.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(d.parent / f".{d.name}.lock")):
        if not (d / META_NAME).is_file():
            _fit_locked(cache, cfg, d, log)
    return load_prior(d, cache.key)


def _groups(cache: PairCache, cfg: PriorConfig) -> int:
    return cache.num_classes + 1 if cfg.per_class and cache.num_classes else 1


def _fit_locked(cache: PairCache, cfg: PriorConfig, d: Path, log) -> None:
    groups, dim = _groups(cache, cfg), int(torch.Size(cache.image_shape).numel())
    moments, done = Moments.zeros(groups, dim), 0
    partial = d / PARTIAL_NAME
    if partial.is_file():
        try:
            done = _restore(partial, moments, len(cache.shards))
            log(f"prior fit: resuming after {done} of {len(cache.shards)} shards")
        except NFMError as e:
            log(f"prior fit: {e}; fitting from the start (the result is the same, only slower)")
            moments, done = Moments.zeros(groups, dim), 0
    bar = progress(len(cache.shards), "prior fit", "shard", initial=done)
    for i in range(done, len(cache.shards)):
        sf = cache.shard(i)
        cols = {"noise": sf.empty("noise"), "label": sf.empty("label")}
        sf.read_verified(cache.shards[i], cols)  # no row is used before the shard's checksum matched
        noise = cols["noise"].double()
        if not torch.isfinite(noise).all():
            raise NFMError(f"pair shard {sf.path} holds NaN/Inf noise; run `nfm pairs verify {cache.key}`")
        label = cols["label"].long()
        if groups > 1 and int(label.max()) >= groups - 1:
            raise NFMError(f"pair shard {sf.path} holds label {int(label.max())} of {groups - 1} classes; rebuild it")
        if groups > 1:
            pooled = torch.full_like(label, groups - 1)
            moments.add(noise, torch.where(label >= 0, label, pooled))
        else:
            moments.add(noise, torch.zeros_like(label))
        d.mkdir(parents=True, exist_ok=True)
        save_state(partial, {**moments.state(), "shards": torch.tensor(i + 1)}, "nfm-prior-partial")
        bar.update(1)
    bar.close()
    if groups > 1:  # the pooled component: every row, labelled or not
        moments.count[-1] = moments.count.sum()
        moments.s1[-1] = moments.s1.sum(0)
        moments.s2[-1] = moments.s2.sum(0)
    prior, stats = FittedPrior.from_moments(moments, cache.image_shape)
    prior.save(d / TENSORS_NAME)
    meta = {
        "kind": "prior",
        "model": "gaussian-oas",
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


def _restore(path: Path, moments: Moments, shards: int) -> int:
    """The moments after the saved number of shards, all or nothing; returns that number."""
    state = load_state(path)
    want = {k: tuple(v.shape) for k, v in moments.state().items()} | {"shards": ()}
    if {k: tuple(v.shape) for k, v in state.items()} != want:
        raise NFMError(f"its saved state {path.name} is of another fit (other tensors or shapes)")
    done = int(state["shards"])
    if not 0 <= done <= shards or not all(torch.isfinite(state[k]).all() for k in ("count", "s1", "s2")):
        raise NFMError(f"its saved state {path.name} holds NaN/Inf or {done} shards of {shards}")
    for k, v in moments.state().items():
        v.copy_(state[k])
    return done


def load_prior(d: Path, cache_key: str | None = None) -> tuple[FittedPrior, dict[str, Any]]:
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
    return FittedPrior.load(path), meta


def teacher_prior(cache: PairCache, teacher_fingerprint: str | None = None, log=print) -> FittedPrior:
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
