"""The settings of `nfm run` (RunConfig and its parts), the NFM knob variants, the training seeds, and the
checks that refuse a run config before its first stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from nfm.core.config import AtLeast1, NonNegative, Positive, Scale, added, check_choices, with_overrides
from nfm.core.errors import NFMError
from nfm.core.seeding import seeded_config
from nfm.pairs.build import PairBuildConfig
from nfm.student.names import ONE_STEP, Objective
from nfm.student.sampling import Solver
from nfm.student.train import StudentRunConfig
from nfm.teacher.train import TeacherRunConfig


@dataclass(frozen=True)
class EvalConfig:
    n: int = 1000  # samples per evaluation (fixed noise, labels with the held-out class histogram)
    seed: int = 2024
    extractor: str = ""  # "" = nfm-DATA for built-in data, else inception-v3-fid-helper
    euler_nfes: tuple[int, ...] = (1, 2, 4, 8)
    higher_solver: Solver = "heun"  # a higher-order solver at a moderate NFE ...
    higher_steps: int = 4  # ... (heun, 4 steps = NFE 7: its last step is Euler)
    dopri5: bool = True  # adaptive, NFE measured
    straightness_steps: int = 32
    teacher: bool = True  # evaluate the teacher's samples too
    # the students' bits/dim through the ODE on held-out x + eta * eps (eta: the teacher's); slow on a CPU
    likelihood: bool = False
    likelihood_n: int = 0  # held-out images (0: all)
    likelihood_solver: Solver = "dopri5"
    likelihood_hutchinson: int = -1  # probes; -1: exact divergence up to 1,024 dimensions, 8 probes above
    # FID's sampling noise: seed 0's students (Euler rows) scored again on this many other noise seeds
    noise_seeds: NonNegative = added(0)
    # the floor: this many draws of n held-out images (with replacement) scored against the held-out set
    floor_draws: AtLeast1 = added(10)
    # rtol = atol of the dopri5 row (benchmarks/eval_bench.py: on the digits students 1e-4 takes 80-86 NFE where 1e-5
    # takes 230-260, and moves FID by at most 0.016; the digits preset uses it)
    dopri5_tol: Positive = added(1e-5)
    # classifier-free guidance: these weights (and 0) tried for the teacher and every class-conditional student at
    # each of guidance_nfes, each model's weight chosen on half the held-out split, scored on the other half
    # (evaluate.choose_guidance); () = no guided rows
    guidance: tuple[float, ...] = added(())
    guidance_nfes: tuple[int, ...] = added((1, 2, 8))
    # one-step students (objectives meanflow, shortcut): steps of their average velocity (solver mean), beside
    # the Euler rows of the instantaneous velocity they learn at h = 0
    mean_nfes: tuple[int, ...] = added((1, 2, 4))


# the couplings of a run: every student coupling, plus nfm-reflow (reflow from the nfm student; `reflow` is
# from the independent student, i.e. 2-rectified flow)
RunCoupling = Literal["nfm", "independent", "minibatch-ot", "sd-ot", "sb", "reflow", "nfm-reflow"]
REFLOW_FROM = {"reflow": "independent", "nfm-reflow": "nfm"}


@dataclass(frozen=True)
class ReflowConfig:
    n: AtLeast1 = 10_000  # pairs (z, ODE(z))
    solver: Solver = "heun"
    steps: AtLeast1 = 8  # fixed-step solvers (heun 8 = NFE 16)
    seed: int = 1  # noise seed of the reflow pairs (the teacher's pairs use pairs.seed)
    batch_size: AtLeast1 = 500


# the baselines that can be trained again for NFM's total compute
MATCHABLE = ("independent", "minibatch-ot", "sd-ot", "sb")
MatchedBy = Literal["flops", "seconds"]

# short names of the NFM knobs (`knobs=eta=0,views=1,mix=0.25`); any pairs.* / student.* key works too, and
# "+" joins several settings into one variant (views=128+steps=3000)
KNOBS = {
    "eta": "pairs.eta_scale",  # noise added before encoding, x the teacher's eta
    "views": "pairs.views",  # noise draws (pairs) per training image
    "mix": "student.flow.mix_independent",  # fraction of each batch with independent noise
    "steps": "student.train.steps",
    "lr": "student.train.lr",
    "batch": "student.train.batch_size",
    "width": "student.model.width",
    "time": "student.flow.time",
    "prior": "student.sample.prior",  # prior=gaussian: the NFM student sampled from N(0, I), not its fitted prior
}
# the training seeds of a run (seeded): seed k adds SEED_STRIDE * k to each
RUN_SEEDS = ("teacher.train.seed", "pairs.seed", "student.train.seed", "student.flow.sdot.seed", "reflow.seed")


@dataclass(frozen=True)
class RunConfig:
    teacher: TeacherRunConfig = field(default_factory=TeacherRunConfig)
    pairs: PairBuildConfig = field(default_factory=PairBuildConfig)
    student: StudentRunConfig = field(default_factory=StudentRunConfig)
    couplings: tuple[RunCoupling, ...] = ("nfm", "independent", "minibatch-ot")
    eval: EvalConfig = field(default_factory=EvalConfig)
    sb_sigma: Scale = added(0.5)  # the sb student: flow.path=bridge, flow.sigma=sb_sigma (plan reg 2 sigma^2)
    reflow: ReflowConfig = added(ReflowConfig())  # the reflow / nfm-reflow pair caches
    seeds: AtLeast1 = added(1)  # training seeds (teacher, pairs, students); the report gives 95 % intervals
    # the first of them: seeds first_seed .. first_seed + seeds - 1 (one run's seeds split across machines or
    # sessions; `nfm report merge` joins their reports into the report of the whole run)
    first_seed: NonNegative = added(0)
    knobs: tuple[str, ...] = added(())  # NFM variants: eta=0, views=1, mix=0.25, ... (KNOBS)
    knob_seeds: AtLeast1 = added(1)  # the knob variants train on the first knob_seeds seeds
    compute_matched: tuple[RunCoupling, ...] = added(())  # baselines trained again for NFM's total compute
    matched_by: MatchedBy = added("flops")  # flops (counted) or seconds (measured here) of teacher + pairs
    # what the students learn, crossed with the couplings (the same network, steps and batch): fm, and the
    # one-step objectives meanflow and shortcut (students named COUPLING/OBJECTIVE, sampled at eval.mean_nfes)
    objectives: tuple[Objective, ...] = added(("fm",))


def seed_range(cfg: RunConfig) -> range:
    """The training seeds this run trains (first_seed, first_seed + 1, ...)."""
    return range(cfg.first_seed, cfg.first_seed + cfg.seeds)


def seeded(cfg: RunConfig, k: int) -> RunConfig:
    """The config of training seed k: every training seed + SEED_STRIDE * k (k = 0: cfg itself)."""
    return seeded_config(cfg, k, RUN_SEEDS)


def knob_config(cfg: RunConfig, knob: str) -> RunConfig:
    """The run config of one NFM variant: `eta=0`, `views=4+mix=0.25`, `pairs.KEY=V`, `student.KEY=V`."""
    overrides = []
    for part in knob.split("+"):
        key, sep, value = part.partition("=")
        full = KNOBS.get(key.strip(), key.strip())
        if not sep or not full.startswith(("pairs.", "student.")):
            raise NFMError(
                f"knob {part!r} is not NAME=VALUE with NAME one of {', '.join(KNOBS)} or a pairs.* / student.* "
                "key (e.g. knobs=eta=0,views=1,mix=0.25)"
            )
        overrides.append(f"{full}={value}")
    return with_overrides(cfg, overrides)


def knob_name(knob: str) -> str:
    return f"nfm[{knob}]"


def student_name(coupling: str, objective: str) -> str:
    """A run's name of the student of one coupling and objective: the coupling for fm, nfm/meanflow else."""
    return coupling if objective == "fm" else f"{coupling}/{objective}"


def crossed(cfg: RunConfig) -> dict[str, tuple[str, str]]:
    """{student name: (coupling, objective)} of the run's couplings x objectives, in that order."""
    return {student_name(c, o): (c, o) for o in cfg.objectives for c in cfg.couplings}


def needs_teacher(cfg: RunConfig) -> bool:
    """A teacher is trained (or loaded) when a coupling reads its pairs or the report evaluates it."""
    return cfg.eval.teacher or any(c in ("nfm", "nfm-reflow") for c in cfg.couplings)


def check_run(cfg: RunConfig) -> None:
    """Refuse a run config that cannot work, before the first stage starts."""
    check_choices(cfg)
    if not cfg.couplings:
        raise NFMError("couplings must name at least one coupling")
    for knob in cfg.knobs:
        knob_config(cfg, knob)
    if cfg.knobs and "nfm" not in cfg.couplings:
        raise NFMError("knobs are variants of the nfm student: add nfm to couplings")
    for c in cfg.compute_matched:
        if c not in MATCHABLE or c not in cfg.couplings:
            raise NFMError(
                f"compute_matched={c}: name baselines of this run's couplings ({', '.join(MATCHABLE)}) to train "
                "again for NFM's total compute"
            )
    if cfg.compute_matched and "nfm" not in cfg.couplings:
        raise NFMError("compute_matched gives baselines NFM's total compute: add nfm to couplings")
    if not cfg.objectives or len(set(cfg.objectives)) < len(cfg.objectives):
        raise NFMError(f"objectives must name each objective once (fm, meanflow, shortcut), got {cfg.objectives}")
    if any(o in ONE_STEP for o in cfg.objectives):
        if "sb" in cfg.couplings:
            raise NFMError(
                "objectives meanflow and shortcut train on the linear path, and the sb student on the bridge path: "
                "drop sb from couplings, or train its one-step students in a run of their own"
            )
        if cfg.student.flow.path != "linear":
            raise NFMError(
                f"objectives meanflow and shortcut need student.flow.path=linear, not {cfg.student.flow.path}"
            )
