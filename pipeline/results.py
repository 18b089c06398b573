"""The results of `nfm run`, typed from the evaluation to the report: each model's scores over the training seeds
(ModelScores, one Score per sampler) and the run's (RunResults). report.json is written from RunResults.to_json
and read back with RunResults.from_json, which reads every report.json written before these types too: a field
absent from it takes its default, and a key no field names is kept as it came (`extra`) and written back."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar


class _Json:
    """from_json / to_json for a dataclass of plain fields, `extra` for the keys it does not name; `nested`
    names the fields that hold other _Json types (a list of them, a dict of them, or one)."""

    nested: ClassVar[dict[str, type]] = {}
    extra: dict[str, Any]

    @classmethod
    def from_json(cls, d: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if k not in names:
                continue
            sub = cls.nested.get(k)
            if sub is None or v is None:
                kw[k] = v
            elif isinstance(v, list):
                kw[k] = [sub.from_json(x) for x in v]
            elif isinstance(v, dict) and k in cls._dicts:
                kw[k] = {name: sub.from_json(x) for name, x in v.items()}
            else:
                kw[k] = sub.from_json(v)
        return cls(**kw, extra={k: v for k, v in d.items() if k not in names})

    def none_kept(self) -> set[str]:
        """The fields written as null when they hold None (an interval of one seed: there is none); every other
        None field is left out, as the evaluation left it out before these types."""
        return set()

    def to_json(self) -> dict[str, Any]:
        """Every field that holds a value (and those of none_kept), then the keys of `extra`."""
        out: dict[str, Any] = {}
        kept = self.none_kept()
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "extra" or (v is None and f.name not in kept):
                continue
            if isinstance(v, _Json):
                v = v.to_json()
            elif isinstance(v, list) and v and isinstance(v[0], _Json):
                v = [x.to_json() for x in v]
            elif isinstance(v, dict) and f.name in self._dicts:
                v = {name: x.to_json() for name, x in v.items()}
            out[f.name] = v
        return {**out, **self.extra}

    _dicts: ClassVar[frozenset[str]] = frozenset()


@dataclass
class Score(_Json):
    """One sampler of one model over the training seeds: FID and KID as means, with the half-width of their 95 %
    interval (None for one seed) and the value of each seed."""

    fid: float
    kid: float = 0.0
    kid_std: float | None = None  # torch-fidelity's spread over its subsets (mean over the seeds)
    fid_ci: float | None = None
    kid_ci: float | None = None
    fid_seeds: list[float] | None = None
    kid_seeds: list[float] | None = None
    solver: str | None = None  # a student's: euler, heun, midpoint, dopri5
    steps: int | None = None  # None for dopri5 (adaptive)
    nfe: int | None = None  # for dopri5 the mean over the seeds (nfe_seeds: each seed's)
    nfe_seeds: list[int] | None = None
    sampler: str | None = None  # the teacher's: decode, decode+denoise (+ @fitted: from the fitted prior)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def ci(self, metric: str) -> float | None:
        return getattr(self, f"{metric}_ci")

    def none_kept(self) -> set[str]:
        return {"fid_ci", "kid_ci"} | ({"steps"} if self.solver is not None else set())


@dataclass
class ModelScores(_Json):
    """A student's or the teacher's sweep over the training seeds (pipeline.aggregate)."""

    rows: list[Score]
    seeds: int = 1
    memorisation: dict[str, float] | None = None
    straightness: float | None = None  # students: E_t E |v - (x_1 - x_0)|^2 per dimension
    straightness_ci: float | None = None
    straightness_seeds: list[float] | None = None
    likelihood: dict[str, Any] | None = None  # students, seed 0: bits/dim through the ODE
    test_bpd: float | None = None  # the teacher: held-out bits/dim
    test_bpd_ci: float | None = None
    noise_std: float | None = None  # the teacher's eta
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    nested: ClassVar[dict[str, type]] = {"rows": Score}

    def ci(self, metric: str) -> float | None:
        return getattr(self, f"{metric}_ci")

    def none_kept(self) -> set[str]:
        kept = {"straightness_ci"} if self.straightness is not None else {"noise_std"}  # a student / the teacher
        return kept | ({"test_bpd_ci"} if self.test_bpd is not None else set())

    def euler(self) -> dict[int, Score]:
        """The Euler rows by NFE."""
        return {r.nfe: r for r in self.rows if r.solver == "euler"}

    def solver(self, name: str) -> Score | None:
        return next((r for r in self.rows if r.solver == name), None)

    def mean_steps(self) -> dict[int, Score]:
        """A one-step student's rows stepped with its average velocity (solver mean), by NFE."""
        return {r.nfe: r for r in self.rows if r.solver == "mean"}

    def many_step(self) -> Score:
        """The row with the most NFE: dopri5 where it ran, else the largest Euler."""
        return self.solver("dopri5") or max((r for r in self.rows if r.solver == "euler"), key=lambda r: r.nfe)

    def best(self) -> Score:
        return min(self.rows, key=lambda r: r.fid)


@dataclass
class RunResults(_Json):
    """What `nfm run` measured: report.json."""

    preset: str
    n: int  # samples per evaluation
    seed: int  # the evaluation's noise seed
    extractor: str
    reference: int  # held-out images
    students: dict[str, ModelScores]
    teacher: ModelScores | None = None
    seeds: int = 1  # training seeds
    floor: dict[str, Any] | None = None  # held-out resampled: FID's finite-sample floor
    data_floor: dict[str, Any] | None = None
    straightness_steps: int = 32
    fid_warning: str | None = None
    priors: dict[str, str] = field(default_factory=dict)  # model -> "fitted" | "gaussian"
    knobs: list[str] = field(default_factory=list)  # the NFM variants among `students`
    knob_settings: dict[str, str] = field(default_factory=dict)
    sampling_spread: dict[str, Any] | None = None
    guidance: dict[str, Any] | None = None
    per_seed: list[dict[str, Any]] | None = None  # each seed's sweeps as evaluated
    timings: list[dict[str, Any]] = field(default_factory=list)
    total_seconds: float | None = None
    peak_rss_mb: float | None = None
    costs: dict[str, Any] | None = None
    student_steps: int | None = None
    matched: dict[str, Any] | None = None
    pair_cache: dict[str, Any] | None = None
    # where each model is, per training seed: {model: [export of seed 0, seed 1, ...]}, "teacher" among them
    exports: dict[str, list[str]] | None = None
    # a run of several objectives: {student: [coupling, objective]} of its couplings x objectives
    objectives: dict[str, list[str]] | None = None
    # the run's settings as its config.json holds them (`nfm report merge` checks that only the seeds differ)
    config: dict[str, Any] | None = None
    # `nfm report merge`: [{"run": its directory, "seeds": [the training seeds it gave]}, ...]
    merged_from: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    nested: ClassVar[dict[str, type]] = {"students": ModelScores, "teacher": ModelScores}
    _dicts: ClassVar[frozenset[str]] = frozenset({"students"})

    def none_kept(self) -> set[str]:
        return {"teacher", "fid_warning"}

    def seed_ids(self) -> list[int]:
        """The training seeds of per_seed, in its order (reports written before it recorded them: 0, 1, ...)."""
        first = (self.config or {}).get("first_seed", 0)
        return [ps.get("seed", first + i) for i, ps in enumerate(self.per_seed or [])] or [first]

    def main(self) -> dict[str, ModelScores]:
        """The students of the comparison (couplings and compute-matched baselines, not the knob variants)."""
        knobs = set(self.knobs)
        return {k: v for k, v in self.students.items() if k not in knobs}

    def euler_nfes(self) -> list[int]:
        return sorted({r.nfe for res in self.students.values() for r in res.rows if r.solver == "euler"})
