"""Stage three: train a velocity network by flow matching on a coupling.

    loss = E_{(z, x, y) ~ coupling, t ~ p(t)} | v(x_t, t, y') - u_t(z, x) |^2,   x_t = alpha_t x + sigma_t z

with y' = y, dropped to the null class with probability model.class_dropout. All three couplings
run through this one loop with the same network, steps and batch: the comparison is fair.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from torch import nn

from nfm.core.config import Range, Scale, added, check_choices, format_table, from_dict, to_dict
from nfm.core.data import DataConfig, load_data
from nfm.core.distributed import process_state
from nfm.core.errors import NFMError
from nfm.core.images import save_grid
from nfm.core.io import (
    export_dir,
    load_tensors,
    read_export_config,
    sha256_file,
    write_export,
)
from nfm.core.loop import TrainConfig, train
from nfm.core.prior import Prior, describe, load_prior_file
from nfm.core.rundir import log_config, setup_logger
from nfm.core.sampling import sample_and_save
from nfm.core.seeding import BatchRandom
from nfm.pairs.lookup import cache_ref, default_cache_root, find_cache
from nfm.pairs.prior import PriorConfig, fit_prior
from nfm.pairs.reader import FLOW_KINDS, PairCache
from nfm.student.couplings import PAIRED, Coupling, CouplingName, make_coupling, make_source
from nfm.student.meanflow import StepRows, meanflow_loss, pair_steps
from nfm.student.models import StudentModelConfig, build_student
from nfm.student.names import ONE_STEP, Objective
from nfm.student.paths import PathName, ProbPath, TimeSampler, sample_time
from nfm.student.sampling import Grid, Solver, sample_ode, student_inputs
from nfm.student.sdot import SDOTConfig, fit_sdot_for
from nfm.student.shortcut import consistency_steps, grid_time, shortcut_loss


@dataclass(frozen=True)
class FlowConfig:
    coupling: CouplingName = "nfm"  # nfm | independent | minibatch-ot | sd-ot | sb | reflow
    pairs: str = ""  # nfm, reflow: pair cache key (under the cache root) or directory
    path: PathName = "linear"  # linear | vp | ve | bridge
    time: TimeSampler = "uniform"  # uniform | logit-normal
    time_mean: float = 0.0  # logit-normal mean
    time_std: float = 1.0  # logit-normal std
    ve_sigma_min: float = 0.01
    ve_sigma_max: float = 20.0
    sigma: Scale = added(0.0)  # bridge path noise; sb: entropic regularisation 2 sigma^2
    source: str = added("gaussian")  # the t = 0 end: gaussian | data:NAME (independent, minibatch-ot, sb)
    sdot: SDOTConfig = added(SDOTConfig())  # sd-ot: the semidiscrete OT fit
    # nfm, reflow: the fraction of each batch whose pairs take fresh N(0, I) noise (a mixture with independent)
    mix_independent: Annotated[float, Range(min=0, max=1)] = added(0.0)
    # fm: the instantaneous velocity; meanflow / shortcut: the average velocity over a step, for one-step sampling
    # (solver=mean; they set model.interval; linear path only): meanflow from one JVP a training step
    # (student/meanflow.py), shortcut from two steps of half the length (student/shortcut.py)
    objective: Objective = added("fm")
    meanflow_equal: Annotated[float, Range(min=0, max=1)] = added(0.75)  # share of rows with h = 0
    meanflow_power: Annotated[float, Range(min=0)] = added(1.0)  # adaptive loss weight 1 / (err + 1e-3)^power
    shortcut_share: Annotated[float, Range(min=0, max=1)] = added(0.25)  # share of self-consistency rows
    shortcut_levels: Annotated[int, Range(min=1)] = added(7)  # steps 2d = 1, 1/2, .. 2^-(levels-1)

    def make_path(self) -> ProbPath:
        return ProbPath(self.path, self.ve_sigma_min, self.ve_sigma_max, self.sigma)


@dataclass(frozen=True)
class StudentSampleConfig:
    n: int = 100  # preview grid size
    solver: Solver = "euler"
    steps: int = 4  # preview NFE (euler)
    grid: Grid = "uniform"
    guidance: float = 0.0
    seed: int = 4321  # fixed preview noise
    # the prior the student is sampled from, recorded in its export: auto (fitted for pairs of a teacher, N(0, I)
    # otherwise) | gaussian (N(0, I)) | fitted (a Gaussian per class fitted to the pair cache's noise, pairs.prior)
    prior: Literal["auto", "gaussian", "fitted"] = added("auto")


@dataclass(frozen=True)
class StudentRunConfig:
    model: StudentModelConfig = field(default_factory=StudentModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)  # the data of the independent / OT couplings
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: StudentSampleConfig = field(default_factory=StudentSampleConfig)


def flow_matching_loss(coupling: Coupling, path: ProbPath, flow: FlowConfig, class_dropout: float):
    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, ...], rng: BatchRandom):
        z, x, y = coupling.couple(batch, rng)
        t = path.clamp_time(sample_time(x.shape[0], rng, flow.time, flow.time_mean, flow.time_std).to(x.device))
        eps = rng.randn(*x.shape[1:]).to(x.device, x.dtype) if path.stochastic else None
        if flow.objective == "meanflow":  # a second time and a uniform per row: the step [t, t + h]
            s = path.clamp_time(sample_time(x.shape[0], rng, flow.time, flow.time_mean, flow.time_std).to(x.device))
            t, h = pair_steps(t, s, rng.rand().to(x.device), flow.meanflow_equal)
        elif flow.objective == "shortcut":  # a share of rows: a step 2d from a grid point; the rest h = 0
            u_share, u_level, u_place = (rng.rand().to(x.device) for _ in range(3))
            consistent, step = consistency_steps(u_share, u_level, u_place, flow.shortcut_share, flow.shortcut_levels)
            t = torch.where(consistent, grid_time(step, u_place).to(t.dtype), t)
            h = torch.where(consistent, step.to(t.dtype), torch.zeros_like(t))
        xt, u = path.sample(z, x, t, eps)
        if class_dropout > 0:
            y = torch.where(rng.rand().to(y.device) < class_dropout, torch.full_like(y, -1), y)
        if flow.objective in ONE_STEP:
            rows = StepRows(xt, t.to(xt.dtype), h.to(xt.dtype), u, y)
            if flow.objective == "meanflow":
                return meanflow_loss(model, rows, flow.meanflow_power), {}
            return shortcut_loss(model, rows, consistent, 2.0**-flow.shortcut_levels), {}
        v = model(xt, t, y)
        return (v.float() - u.float()).pow(2).mean(), {}

    return loss_fn


def open_coupling(cfg: StudentRunConfig, cache_root: Path | None = None, log=print) -> Coupling:
    flow = cfg.flow
    if flow.coupling in PAIRED:
        if not flow.pairs:
            return make_coupling(flow.coupling)  # raises with the fix
        cache = PairCache(
            find_cache(flow.pairs, cache_root or default_cache_root()), kinds=FLOW_KINDS, reader="a flow student"
        )
        return make_coupling(flow.coupling, cache=cache, mix=flow.mix_independent)
    data = load_data(cfg.data, "train")
    source = make_source(flow.source, cfg.data, "train", tuple(data.image_shape))
    sdot = fit_sdot_for(data, flow.sdot, cache_root, log=log) if flow.coupling == "sd-ot" else None
    return make_coupling(flow.coupling, data=data, source=source, sigma=flow.sigma, sdot=sdot, mix=flow.mix_independent)


def resolve(cfg: StudentRunConfig, coupling: Coupling) -> StudentRunConfig:
    c, h, w = coupling.image_shape
    model = cfg.model.resolved(c, h, coupling.num_classes)
    if (model.in_channels, model.img_size) != (c, h) or h != w:
        raise NFMError(
            f"the {coupling.name} coupling gives {c}x{h}x{w} images but the student is configured for "
            f"{model.in_channels}x{model.img_size}x{model.img_size}: leave model.in_channels/img_size at 0 "
            "(from the data), or use a pair cache built for this image shape"
        )
    if model.num_classes > coupling.num_classes:
        raise NFMError(f"model.num_classes={model.num_classes} but the data has {coupling.num_classes} classes")
    flow = cfg.flow
    if flow.objective in ONE_STEP:
        if flow.path != "linear":
            raise NFMError(
                f"objective={flow.objective} needs flow.path=linear (its steps are the linear path's, from t = 0 "
                f"to 1), not {flow.path}"
            )
        model = replace(model, interval=True)
        if cfg.sample.solver == "euler":  # the preview steps the average velocity it learns
            cfg = replace(cfg, sample=replace(cfg.sample, solver="mean"))
    model.validate()
    if flow.coupling in PAIRED and flow.source != "gaussian":
        raise NFMError(f"the {flow.coupling} coupling reads its source end from its pair cache: leave flow.source")
    if flow.coupling in PAIRED and flow.pairs:
        flow = replace(flow, pairs=str(coupling.cache.dir.resolve()))
    data = _cache_data(cfg.data, coupling) if flow.coupling in PAIRED else cfg.data
    return replace(cfg, model=model, flow=flow, data=data)


def _cache_data(data: DataConfig, coupling: Coupling) -> DataConfig:
    """The data a paired student records (what `nfm student eval` and the report load again): the pair
    cache's own, where data.* was left at its defaults; a data.name that disagrees with the cache's is refused."""
    recorded = (coupling.cache.index.get("data") or {}).get("config")
    if not recorded:  # caches built before the data config was recorded
        return data
    cached = from_dict(DataConfig, recorded)
    if data == DataConfig():
        return cached
    if data.name != cached.name:
        raise NFMError(
            f"pair cache {coupling.cache.key} was built on data.name={cached.name!r}, but this student has "
            f"data.name={data.name!r}: leave data.* unset (the student takes the cache's data), or build pairs "
            f"on {data.name!r}"
        )
    return data


def training_prior(cfg: StudentRunConfig, coupling: Coupling, log=print) -> tuple[Prior, dict[str, Any]] | None:
    """The fitted prior this student will be sampled from (fitted to its pair cache once, pairs.prior), or None
    for N(0, I): sample.prior=fitted, or auto on the pairs of a teacher."""
    choice, cache = cfg.sample.prior, getattr(coupling, "cache", None)
    if choice == "fitted" and cache is None:
        raise NFMError(
            f"sample.prior=fitted fits the noise of a pair cache, and the {coupling.name} coupling reads none: "
            "leave sample.prior unset (N(0, I) for this coupling)"
        )
    if choice == "gaussian" or cache is None or (choice == "auto" and cache.kind != "teacher"):
        return None
    prior, meta = fit_prior(cache, PriorConfig(), log=log)
    log(f"sampled from the prior fitted to the pair cache's noise ({describe(meta['components'])})")
    return prior, meta


def sample_grid(model: nn.Module, cfg: StudentRunConfig, path: Path, prior: Prior | None = None) -> None:
    """The preview grid: fixed noise through the student's prior (or held-out source images), `sample.steps`
    steps of `sample.solver`. From a data source the grid shows (source, sample) side by side."""
    s, mc = cfg.sample, cfg.model
    device = next(model.parameters()).device
    meta = {"model": asdict(mc), "flow": asdict(cfg.flow), "data": asdict(cfg.data)}
    inputs = student_inputs(meta, s.n, seed=s.seed, device=device, prior=prior)

    def sampler(z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        opts = dict(solver=s.solver, steps=s.steps, grid=s.grid, guidance=s.guidance, num_classes=mc.num_classes)
        return sample_ode(model, z, y, **opts)[0]

    if cfg.flow.source == "gaussian":
        sample_and_save(sampler, inputs, mc.num_classes, path)
    else:
        x = sampler(inputs.z, inputs.y)
        save_grid(torch.stack([inputs.z.to(x.device), x], 1).flatten(0, 1), path, nrow=10)


PRIOR_NAME = "prior.safetensors"


def save_student(
    model: nn.Module,
    directory: Path,
    step: int,
    cfg: StudentRunConfig,
    extra: dict | None = None,
    prior: tuple[Prior, dict[str, Any]] | None = None,
):
    """The export: model.safetensors and config.json; with a fitted prior, prior.safetensors beside them and its
    description (and checksum) under config.json's "prior"."""
    if prior is not None:
        prior[0].save(Path(directory) / PRIOR_NAME)
        p = prior[1]
        extra = {
            **(extra or {}),
            "prior": {"model": p["model"], "key": p["key"], "cache_key": p["cache_key"],
                      "sha256": sha256_file(Path(directory) / PRIOR_NAME), "components": p["components"]},
        }  # fmt: skip
    state = {k: v.float() for k, v in model.state_dict().items()}
    flow = asdict(cfg.flow)
    flow["pairs"] = cache_ref(flow["pairs"]) if flow["pairs"] else ""  # its key: no local path in an export
    config = {
        "step": step,
        "model": asdict(cfg.model),
        "flow": flow,
        "data": asdict(cfg.data),
        **(extra or {}),
    }
    write_export(directory, state, "student", config)


def _export_dir(path: str | Path) -> Path:
    return export_dir(path, "student", "nfm student train")


def student_prior(path: str | Path, meta: dict[str, Any], choice: str = "auto") -> Prior | None:
    """The prior to sample the student at `path` (meta: its config.json) from: auto (the fitted prior its export
    records, else N(0, I)) | gaussian (None: N(0, I)) | fitted (its recorded prior, which must exist). The prior
    file is checked against the checksum in config.json."""
    if choice not in ("auto", "gaussian", "fitted"):
        raise NFMError(f"prior={choice!r}: choose auto, gaussian or fitted")
    info = meta.get("prior")
    if choice == "gaussian" or (info is None and choice == "auto"):
        return None
    d = _export_dir(path)
    if info is None:
        raise NFMError(
            f"the student in {d} records no fitted prior (trained before priors existed, or not on a teacher's "
            "pairs): sample it with prior=gaussian, or retrain it on a pair cache (sample.prior=fitted)"
        )
    f = d / PRIOR_NAME
    if not f.is_file() or sha256_file(f) != info.get("sha256"):
        raise NFMError(
            f"the student's prior {f} is missing or does not match the checksum in its config.json: copy the "
            "export whole, or sample with prior=gaussian"
        )
    return load_prior_file(f, "the student's prior")


def load_student(path: str | Path, device="cpu") -> tuple[nn.Module, dict[str, Any]]:
    d, meta = read_export_config(path, "student", "student", "nfm student train")
    model = build_student(from_dict(StudentModelConfig, meta["model"]))
    try:
        model.load_state_dict(load_tensors(d / "model.safetensors", "student weights"))
    except RuntimeError as e:
        raise NFMError(f"student weights in {d} do not match its config: {e}") from e
    return model.to(device).eval().requires_grad_(False), meta


def _class_names(coupling: Coupling) -> dict[str, list[str]] | None:
    """{"class_names": [...]} of the data a coupling reads (its data set, or its pair cache's), for the export."""
    data = getattr(coupling, "data", None)
    names = data.class_names if data is not None else coupling.cache.index["data"].get("class_names")
    return {"class_names": list(names)} if names else None


def run_student_training(
    cfg: StudentRunConfig, run_dir: Path, cache_root: Path | None = None, echo_config: bool = True
) -> Path:
    """`nfm student train`: train (or resume) a student in run_dir; returns the export directory."""
    run_dir = Path(run_dir)
    check_choices(cfg)
    log = setup_logger(run_dir, main=process_state().is_main_process)
    coupling = open_coupling(cfg, cache_root, log=log.info)
    cfg = resolve(cfg, coupling)
    log_config(log, format_table(cfg, f"nfm student train -> {run_dir}"), echo_config)
    log.info(coupling.describe())
    torch.manual_seed(cfg.train.seed)
    model = build_student(cfg.model)
    path = cfg.flow.make_path()
    prior = training_prior(cfg, coupling, log=log.info)
    return train(
        run_dir=run_dir,
        cfg=cfg.train,
        model=model,
        batches=coupling.stream(cfg.train.seed, cfg.train.steps, cfg.train.num_workers),
        loss_fn=flow_matching_loss(coupling, path, cfg.flow, cfg.model.class_dropout if cfg.model.num_classes else 0),
        resolved_config=to_dict(cfg),
        export_fn=lambda m, d, step: save_student(m, d, step, cfg, _class_names(coupling), prior=prior),
        sample_fn=lambda m, png: sample_grid(m, cfg, png, prior[0] if prior else None),
        desc=f"student[{coupling.name}]",
        sample_shape=tuple(coupling.image_shape),
        log=log,
    )
