"""What the stages of one `nfm run` share: the run (directories, device, log, stage timings, each data set loaded
once) and one training seed's view of it (its config, its costs file, its log prefix, what it produced)."""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nfm.core.config import config_hash
from nfm.core.data import DataConfig, ImageDataset, load_data
from nfm.core.io import read_json, write_json
from nfm.pairs.build import PairBuildResult
from nfm.pipeline.run.config import REFLOW_FROM, RunConfig
from nfm.student.train import StudentRunConfig
from nfm.teacher.protocol import Teacher


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Stages:
    """Times each stage and says whether it was reused."""

    def __init__(self, log: logging.Logger):
        self.log, self.timings = log, []

    def done(self, name: str, reused: bool, t0: float) -> None:
        self.timings.append({"stage": name, "seconds": round(time.perf_counter() - t0, 1), "reused": reused})
        self.log.info(f"[{name}] {'reused' if reused else 'done'} in {self.timings[-1]['seconds']:.1f}s")


class Costs:
    """RUN/costs.json (seed k > 0: costs-seed{k}.json): seconds each coupling's preparation took when it ran
    (kept across reuse)."""

    def __init__(self, run_dir: Path, main: bool, seed: int = 0):
        self.path, self.main = run_dir / ("costs.json" if seed == 0 else f"costs-seed{seed}.json"), main
        self.data: dict[str, Any] = read_json(self.path, "costs") if self.path.is_file() else {}

    def record(self, name: str, seconds: float | None, **extra: Any) -> None:
        """Record a stage's seconds (None: only write what is in `data` already)."""
        if seconds is not None:
            self.data[name] = {"seconds": round(seconds, 1), **extra}
        if self.main:
            write_json(self.path, self.data)


@dataclass
class RunContext:
    """One `nfm run`: where it writes, what it runs on, and the data sets it has loaded (each once)."""

    run_dir: Path
    cache_root: Path
    from_teacher: str | None  # an export, ml-tarflow:PATH or python:module:factory (None: trained here)
    teacher_arch: str | None
    stages: Stages
    device: Any
    main: bool  # the main process: the one that writes costs, evaluates and reports
    _data: dict[tuple[str, str], ImageDataset] = field(default_factory=dict, repr=False)

    @property
    def log(self) -> logging.Logger:
        return self.stages.log

    def data(self, cfg: DataConfig, split: str) -> ImageDataset:
        """The `split` of the data set `cfg`, loaded the first time it is asked for (every seed and the
        evaluation read the same images)."""
        key = (config_hash(cfg), split)
        if key not in self._data:
            self._data[key] = load_data(cfg, split)
        return self._data[key]


@dataclass
class SeedContext:
    """Training seed k of a run: its config (seeded(run config, k)), its costs, the prefix of its log lines,
    and the data its teacher was trained on (the preset's, or a --from-teacher export's own)."""

    run: RunContext
    cfg: RunConfig
    k: int
    costs: Costs
    data_cfg: DataConfig

    @classmethod
    def make(cls, run: RunContext, cfg: RunConfig, k: int) -> SeedContext:
        return cls(run, cfg, k, Costs(run.run_dir, run.main, k), cfg.teacher.data)

    @property
    def prefix(self) -> str:
        return f"seed {self.k}: " if self.cfg.seeds > 1 or self.cfg.first_seed else ""

    @property
    def log(self) -> logging.Logger:
        return self.run.log

    def done(self, name: str, reused: bool, t0: float) -> None:
        self.run.stages.done(f"{self.prefix}{name}", reused, t0)

    def train_data(self) -> ImageDataset:
        return self.run.data(self.data_cfg, self.cfg.pairs.split)

    def student_cfg(self, coupling: str, pairs_dir: str, cfg: RunConfig | None = None) -> StudentRunConfig:
        """The student config of one coupling (cfg: a knob's or a longer run's config; default the seed's)."""
        cfg = cfg or self.cfg
        flow = replace(cfg.student.flow, coupling="reflow" if coupling in REFLOW_FROM else coupling, pairs=pairs_dir)
        if coupling == "sb":
            flow = replace(flow, path="bridge", sigma=cfg.sb_sigma or flow.sigma)
        return replace(cfg.student, data=self.data_cfg, flow=flow)


@dataclass
class SeedRun:
    """What one training seed produced."""

    seed: SeedContext
    teacher: Teacher | None
    teacher_source: str | None  # its export, or the --from-teacher spec
    pairs: PairBuildResult | None
    trained: dict[str, Path]  # every student trained (with the sources of reflow couplings)
    evaluated: dict[str, Path]  # couplings, compute-matched baselines, knob variants
    priors: dict[str, str]  # the prior each evaluated student is sampled from, where not its own (student_prior)
