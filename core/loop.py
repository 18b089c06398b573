"""The training loop every stage shares, built on accelerate.

Step-based and reproducible (after NVlabs/edm2):
  * the learning rate is a pure function of the step (linear warmup, then cosine);
  * the batch of step s is a pure function of (seed, s) (batches.py);
  * randomness inside the loss (noise, label dropout) is drawn per row of the global batch
    from (seed, step): row i gets the same noise whatever the number of processes or
    accumulation rounds (seeding.BatchRandom);
  * checkpoints (model, EMA, optimizer, step) are written atomically on a fixed cadence and on
    Ctrl-C / SIGTERM; a rerun of the same command resumes from the newest one, so a resumed run
    on the CPU ends with the same weights as an uninterrupted one.

A stage supplies the model, a loss function, an optional sampler for preview grids and an
export function; the loop owns everything else.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from torch import nn

from nfm.core.batches import BatchStream, dataset_batches
from nfm.core.checkpoint import (
    EMA,
    list_checkpoints,
    load_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
)
from nfm.core.config import AtLeast1, Fraction, NonNegative, Positive, Range, added, check_choices
from nfm.core.distributed import force_cpu, process_state
from nfm.core.errors import NFMError
from nfm.core.io import atomic_dir
from nfm.core.rundir import (
    append_metrics,
    prepare_run_dir,
    progress,
    run_dir_lock,
    run_identity,
    setup_logger,
    truncate_metrics,
)
from nfm.core.seeding import BatchRandom

LossFn = Callable[
    [nn.Module, tuple[torch.Tensor, ...], BatchRandom], tuple[torch.Tensor, dict[str, torch.Tensor | float]]
]


@dataclass(frozen=True)
class TrainConfig:
    steps: AtLeast1 = 2000  # optimizer steps
    batch_size: AtLeast1 = 256  # global batch: all processes and accumulation rounds together
    lr: Positive = 5e-4  # peak learning rate
    warmup_steps: NonNegative = 200  # linear warmup from 0, then cosine to min_lr_ratio * lr
    min_lr_ratio: Annotated[float, Range(min=0, max=1)] = 0.01
    weight_decay: Annotated[float, Range(min=0)] = 1e-4
    beta1: Fraction = 0.9
    beta2: Fraction = 0.95
    grad_clip: Annotated[float, Range(min=0)] = 1.0  # max global gradient norm; 0 disables
    grad_accum: AtLeast1 = 1  # micro-batches per optimizer step
    ema_decay: Fraction = 0.999  # EMA of weights; warmed up as min(decay, (1 + s) / (10 + s))
    mixed_precision: Literal["no", "bf16"] = "no"  # bf16: the flow's affine arithmetic stays float32
    seed: NonNegative = 0
    log_every: AtLeast1 = 50
    sample_every: NonNegative = 500  # preview grid cadence (0: only at the end)
    ckpt_every: NonNegative = 500  # checkpoint cadence (0: only at the end and on interrupt)
    keep_ckpts: AtLeast1 = 2  # newest checkpoints kept
    num_workers: NonNegative = 0  # DataLoader workers (for lazily decoded data sets)
    # experiment trackers through accelerate (comma-separated: tensorboard, wandb, mlflow, ...), logging what
    # metrics.jsonl holds; their files go under RUN/trackers. The tracker's package must be installed.
    log_with: str = added("")
    # torch.compile of the model for the training step: true | false | auto (on for a CUDA run of at least
    # COMPILE_MIN_STEPS steps; off on CPUs, where it did not pay: see use_compile)
    compile: Literal["auto", "true", "false"] = added("auto")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to min_lr_ratio * lr at cfg.steps."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


class _Stop:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so the step in flight finishes and is
    checkpointed. Before the first step of this process has finished (nothing to save, and a first step
    can take very long) the first signal stops at once; a second one always does."""

    def __init__(self):
        self.requested = False
        self.nothing_to_save = True
        self.step = 0
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.nothing_to_save:
            raise Interrupted(f"interrupted at step {self.step} (before its first step finished: nothing to save)")

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class Interrupted(Exception):
    """Training stopped on request (after saving a checkpoint, if a step had finished since the last one)."""


@dataclass
class _Session:
    """What one call of `train` holds: the accelerator, the prepared model / optimizer and the EMA."""

    acc: Any
    cfg: TrainConfig
    run_dir: Path
    model: nn.Module  # as prepared by accelerate (maybe DDP-wrapped)
    raw_model: nn.Module
    opt: Any  # accelerate's optimizer wrapper
    raw_opt: torch.optim.Optimizer
    ema: EMA
    log: logging.Logger
    autocast_dtype: torch.dtype | None
    run_id: str  # rundir.run_identity of the resolved config: written into checkpoints, required of them
    step: int = 0

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def per_process(self) -> int:
        return self.cfg.batch_size // self.world

    @property
    def micro(self) -> int:
        return self.per_process // self.cfg.grad_accum

    def checkpoint(self) -> None:
        if self.acc.is_main_process:
            save_checkpoint(
                self.run_dir, self.step, self.raw_model, self.ema, self.raw_opt, self.cfg.keep_ckpts, self.run_id
            )
        self.acc.wait_for_everyone()

    def resume(self) -> None:
        """Load the newest checkpoint that loads whole; a damaged or foreign one is skipped with a warning.
        Loading is all or nothing, so if none loads the run starts exactly as a clean run (step 0)."""
        for ckpt in reversed(list_checkpoints(self.run_dir)):
            try:
                self.step = load_checkpoint(ckpt, self.raw_model, self.ema, self.raw_opt, self.run_id)
                self.log.info(f"resumed from {ckpt} (step {self.step})")
                return
            except Exception as e:  # any failure: this checkpoint is not used, nothing of it was loaded
                self.log.warning(f"skipping checkpoint {ckpt}: {e} ({type(e).__name__})")

    def optimizer_step(self, batch: tuple[torch.Tensor, ...], loss_fn: LossFn) -> dict[str, Any]:
        """One optimizer step on this process's part of the global batch, in grad_accum micro-batches.

        The logged values stay on the device (a float per step would wait for the device every step): `settle`
        brings a window of them to the host at once and stops at a non-finite one."""
        acc, cfg, micro = self.acc, self.cfg, self.micro
        lr = lr_at(self.step, cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        logs: dict[str, Any] = {}
        for m in range(cfg.grad_accum):
            part = tuple(t[m * micro : (m + 1) * micro].to(acc.device, non_blocking=True) for t in batch)
            sync = m == cfg.grad_accum - 1
            with nullcontext() if sync else acc.no_sync(self.model):  # all-reduce on the last round only
                with torch.autocast(
                    acc.device.type,
                    dtype=self.autocast_dtype or torch.bfloat16,
                    enabled=self.autocast_dtype is not None,
                ):
                    offset = acc.process_index * self.per_process + m * micro
                    rng = BatchRandom(cfg.seed, self.step, offset, micro, cfg.batch_size, acc.device)
                    loss, extra = loss_fn(self.model, part, rng)
                acc.backward(loss / cfg.grad_accum)
            for k, v in {"loss": loss, **extra}.items():
                v = v.detach().float() if isinstance(v, torch.Tensor) else v
                logs[k] = logs.get(k, 0.0) + v / cfg.grad_accum
        logs["grad_norm"] = self._grad_norm()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.raw_model, self.step)
        self.step += 1
        return {**logs, "lr": lr}

    def _grad_norm(self) -> torch.Tensor:
        """Clip to cfg.grad_clip (when > 0) and return the global gradient norm before clipping."""
        params = self.model.parameters()
        if self.cfg.grad_clip > 0:
            return self.acc.clip_grad_norm_(params, self.cfg.grad_clip).detach().float()
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])).float()

    def settle(self, window: list[dict[str, Any]]) -> None:
        """Bring the window's logged values to the host in one transfer (in place), and stop at the first step
        whose loss or gradient norm is not finite: called before anything (a log line, a checkpoint, a preview,
        the export) could carry that step's weights. window[-1] is the step just taken."""
        todo = [i for i, w in enumerate(window) if any(isinstance(v, torch.Tensor) for v in w.values())]
        if not todo:
            return
        keys = list(window[todo[0]])
        device = self.acc.device
        values = torch.stack([torch.stack([torch.as_tensor(window[i][k], dtype=torch.float32, device=device)
                                           for k in keys]) for i in todo]).tolist()  # fmt: skip
        for i, row in zip(todo, values):
            window[i] = dict(zip(keys, row))
            if not (math.isfinite(window[i]["loss"]) and math.isfinite(window[i]["grad_norm"])):
                step = self.step - len(window) + i
                raise NFMError(
                    f"training diverged at step {step} (loss {window[i]['loss']}, grad norm "
                    f"{window[i]['grad_norm']}). The newest checkpoint under {self.run_dir / 'checkpoints'} is "
                    "intact: lower train.lr or raise train.warmup_steps, and rerun"
                )

    def log_window(self, window: list[dict[str, float]], seconds: float, lr: float, metrics_path: Path) -> None:
        """Mean of the logged values over the window (across processes), to metrics.jsonl and the log."""
        means = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
        if self.world > 1:
            keys = sorted(means)
            t = self.acc.reduce(torch.tensor([means[k] for k in keys], device=self.acc.device), "mean")
            means = dict(zip(keys, t.tolist()))
        rec = {
            "step": self.step,
            **{k: round(v, 6) for k, v in means.items()},
            "lr": lr,
            "img_per_s": round(len(window) * self.cfg.batch_size / max(seconds, 1e-9), 1),
        }
        where = {"device": self.acc.device.type, "processes": self.world, "threads": torch.get_num_threads()}
        if self.cfg.log_with:
            self.acc.log({k: v for k, v in rec.items() if k != "step"}, step=self.step)
        rec |= where  # what img/s was measured on: costs compare only students trained alike
        if self.acc.is_main_process:
            append_metrics(metrics_path, rec)
            parts = " ".join(f"{k} {v:.4f}" for k, v in means.items())
            self.log.info(f"(step={self.step:07d}) {parts} lr {lr:.2e} img/s {rec['img_per_s']:.0f}")


def _init_trackers(acc, trackers: list[str], run_dir: Path, resolved: dict) -> None:
    """Start the trackers: one run named after the run directory, its config flattened to scalars
    (TensorBoard's hparams take no nested values)."""
    flat: dict[str, Any] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[prefix + k] = v if isinstance(v, int | float | str | bool) else str(v)

    walk(resolved, "")
    try:
        acc.init_trackers(run_dir.name, config=flat)
    except Exception as e:  # a tracker whose package is missing, or that cannot start
        raise NFMError(
            f"train.log_with={','.join(trackers)}: the tracker could not start ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); install its package (tensorboard: pip install "
            "tensorboard) or leave train.log_with unset"
        ) from e


def count_text(n: int) -> str:
    """A parameter count for people: 1.23M, 45.6k, 789 (a small model is not "0.00M")."""
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def check_batch_fits(cfg: TrainConfig, sample_shape: tuple[int, ...], world: int) -> None:
    """Refuse a batch whose inputs alone (float32 data and noise of one process's micro-batch) exceed the
    memory this machine has available: such a step would swap or sit at step 0 for hours."""
    import psutil

    micro = cfg.batch_size // world // cfg.grad_accum
    need = micro * 2 * 4 * math.prod(sample_shape)  # bytes: data + noise, float32 (activations come on top)
    have = psutil.virtual_memory().available
    if need > have:
        raise NFMError(
            f"train.batch_size={cfg.batch_size} needs at least {need / 2**30:.1f} GB per process for its inputs "
            f"alone ({micro} samples of {'x'.join(map(str, sample_shape))}), more than the {have / 2**30:.1f} GB "
            "available: lower train.batch_size or raise train.grad_accum"
        )


def _start(
    run_dir: Path,
    cfg: TrainConfig,
    model: nn.Module,
    resolved: dict,
    log: logging.Logger | None,
    accelerator,
    sample_shape: tuple[int, ...] | None = None,
) -> _Session:
    from accelerate import Accelerator

    # bf16 autocast is applied by this loop, not by accelerate's process-wide (and, once set, fixed)
    # mixed-precision state: one process can then train a float32 teacher and a bf16 student in turn.
    check_choices(cfg, "train.")  # a config built in Python is held to the bounds a loaded one is
    trackers = [t.strip() for t in cfg.log_with.split(",") if t.strip()]
    if accelerator is not None and trackers:
        raise NFMError("train.log_with needs the accelerator this loop creates; leave it unset when passing one")
    try:
        acc = accelerator or Accelerator(
            cpu=force_cpu(), log_with=trackers or None, project_dir=str(run_dir / "trackers") if trackers else None
        )
    except ValueError as e:  # accelerate names the trackers it knows
        raise NFMError(f"train.log_with={cfg.log_with}: {e}") from e
    # accelerate drops a known tracker whose package is missing with only a log line: training would end with no
    # tracker at all
    started = {str(getattr(t, "value", t)) for t in acc.log_with or []}
    missing = [t for t in trackers if t != "all" and t not in started]
    if missing:
        raise NFMError(
            f"train.log_with={cfg.log_with}: {', '.join(missing)} cannot start here (its package is not installed: "
            f"pip install {' '.join(missing)}); install it, or leave {', '.join(missing)} out of train.log_with"
        )
    if trackers:
        _init_trackers(acc, trackers, run_dir, resolved)
    world = acc.num_processes
    if cfg.batch_size % (world * cfg.grad_accum):
        raise NFMError(
            f"train.batch_size={cfg.batch_size} must be divisible by processes x grad_accum "
            f"= {world} x {cfg.grad_accum}"
        )
    if sample_shape:
        check_batch_fits(cfg, sample_shape, world)
    log = log or setup_logger(run_dir, main=acc.is_main_process)
    if acc.is_main_process:
        prepare_run_dir(run_dir, resolved)
        remove_partial_checkpoints(run_dir)  # under the run directory's lock: no other writer
    acc.wait_for_everyone()
    opt = adamw(model, cfg)
    model, opt = acc.prepare(model, opt)  # moves the model to the device; the optimizer follows it
    raw_model = acc.unwrap_model(model)
    return _Session(
        acc=acc,
        cfg=cfg,
        run_dir=run_dir,
        model=model,
        raw_model=raw_model,
        opt=opt,
        raw_opt=opt.optimizer if hasattr(opt, "optimizer") else opt,
        ema=EMA(raw_model, cfg.ema_decay),
        log=log,
        autocast_dtype=torch.bfloat16 if cfg.mixed_precision == "bf16" else None,
        run_id=run_identity(resolved),
    )


COMPILE_MIN_STEPS = 2000
COMPILE_OPTIONS: dict[str, Any] = {}  # torch.compile's keyword arguments (default: inductor)


def use_compile(cfg: TrainConfig, device: torch.device, steps_left: int) -> tuple[bool, str]:
    """Whether the training step runs the model under torch.compile, and why (a line for the log).

    auto: on for a CUDA run of at least COMPILE_MIN_STEPS steps, where small models are launch-bound and
    compilation fuses their kernels (not measured yet); off on CPUs, where it was measured not to pay (2-core
    Xeon, torch 2.14, benchmarks/results/compile-cpu.md and mltarflow-cpu.md): the teacher's step 1.06-1.15x
    faster after a 30-56 s compile, the conv-S student's 1.06x."""
    if cfg.compile != "auto":
        return cfg.compile == "true", f"train.compile={cfg.compile}"
    if device.type != "cuda":
        return False, f"train.compile=auto: off on {device.type} (it does not pay there; train.compile=true forces it)"
    if steps_left < COMPILE_MIN_STEPS:
        return (
            False,
            f"train.compile=auto: off for {steps_left} steps (< {COMPILE_MIN_STEPS}: the compile would not pay)",
        )
    return True, f"train.compile=auto: on ({steps_left} steps on {device.type})"


@contextmanager
def _compile_errors(first_compiled_step: bool):
    """A failure of the first compiled step (torch.compile compiles there: no compiler, an unsupported op) as one
    line naming the way out."""
    try:
        yield
    except (NFMError, KeyboardInterrupt, Interrupted):
        raise
    except Exception as e:
        if not first_compiled_step:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise NFMError(f"torch.compile failed on the first step ({type(e).__name__}: {first}); "
                       "rerun with train.compile=false") from e  # fmt: skip


def adamw(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with torch's fused kernel, falling back to the multi-tensor (foreach) form where the fused one is not
    available for these parameters. The digits8 teacher's train step at batch 128 (benchmarks/teacher_bench.py,
    2-core Xeon): 700 img/s fused, 605 foreach, 528 with torch's default per-parameter loop on the CPU."""
    kw = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "weight_decay": cfg.weight_decay}
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(model.parameters(), foreach=True, **kw)


def train(
    *,
    run_dir: Path,
    cfg: TrainConfig,  # the optimisation settings
    model: nn.Module,  # freshly initialised (weights are replaced on resume)
    dataset: torch.utils.data.Dataset | None = None,  # __getitems__(rows) -> batch tuple; or:
    batches: BatchStream | None = None,  # a batch stream (e.g. a pair cache's)
    loss_fn: LossFn,  # (model, batch on device, BatchRandom) -> (scalar loss, logs)
    resolved_config: dict[str, Any],  # written to RUN/config.json
    export_fn: Callable[[nn.Module, Path, int], None],  # (EMA model, directory, step): write the export
    sample_fn: Callable[[nn.Module, Path], None] | None = None,  # (EMA model, png path): preview grid
    desc: str = "train",
    log: logging.Logger | None = None,
    accelerator=None,
    sample_shape: tuple[int, ...] | None = None,  # one sample's shape, for the memory check (else the data's)
) -> Path:
    """Train to cfg.steps (resuming from RUN/checkpoints if present); returns RUN/export."""
    if batches is None:
        if dataset is None or len(dataset) == 0:
            raise NFMError("the training set is empty")
        batches = dataset_batches(dataset, cfg.seed, cfg.steps, cfg.num_workers)
        sample_shape = sample_shape or getattr(dataset, "image_shape", None)
    main = accelerator.is_main_process if accelerator is not None else process_state().is_main_process
    with run_dir_lock(run_dir, main=main):
        s = _start(run_dir, cfg, model, resolved_config, log, accelerator, sample_shape)
        acc, export_dir, metrics_path = s.acc, run_dir / "export", run_dir / "metrics.jsonl"
        s.resume()
        if acc.is_main_process:
            truncate_metrics(metrics_path, s.step)
        if s.step >= cfg.steps and (export_dir / "config.json").exists():
            s.log.info(f"run already complete ({s.step} steps); export: {export_dir}")
            return export_dir

        ema_model = copy.deepcopy(s.raw_model).eval().requires_grad_(False)
        compiled, why = use_compile(cfg, acc.device, cfg.steps - s.step)
        if compiled:  # after the copy: the EMA model (previews, export) stays eager; state_dict keys unchanged
            s.raw_model.compile(**COMPILE_OPTIONS)
        s.log.info(f"torch.compile {'on' if compiled else 'off'} ({why})")
        stream = itertools.islice(
            batches(acc.process_index, s.world, s.per_process, s.step), max(0, cfg.steps - s.step)
        )
        n_params = sum(p.numel() for p in s.raw_model.parameters())
        s.log.info(
            f"{desc}: {count_text(n_params)} parameters, {s.world} process(es) on {acc.device}, "
            f"global batch {cfg.batch_size} ({s.micro} x {cfg.grad_accum} accum x {s.world}), "
            f"steps {s.step} -> {cfg.steps}"
        )

        def preview() -> None:
            if sample_fn is not None and acc.is_main_process:
                sample_fn(s.ema.copy_to(ema_model), run_dir / "samples" / f"step-{s.step:07d}.png")

        window: list[dict[str, float]] = []
        t_window = time.perf_counter()
        bar = progress(cfg.steps, desc, "step", initial=s.step, main=acc.is_main_process)
        last_ckpt = s.step
        with _Stop() as stop:
            stop.step = s.step
            for batch in stream:  # this process's part of the step's global batch
                with _compile_errors(compiled and stop.nothing_to_save):
                    logs = s.optimizer_step(batch, loss_fn)
                stop.step, stop.nothing_to_save = s.step, False
                lr = logs.pop("lr")
                window.append(logs)
                bar.update(1)
                ckpt = cfg.ckpt_every and s.step % cfg.ckpt_every == 0 and s.step < cfg.steps
                show = cfg.sample_every and s.step % cfg.sample_every == 0 and s.step < cfg.steps
                if s.step % cfg.log_every == 0 or s.step == cfg.steps or ckpt or show or stop.requested:
                    s.settle(window)  # the only wait for the device between log lines
                if s.step % cfg.log_every == 0 or s.step == cfg.steps:
                    bar.set_postfix({k: f"{v:.4f}" for k, v in window[-1].items() if k != "grad_norm"}, refresh=False)
                    s.log_window(window, time.perf_counter() - t_window, lr, metrics_path)
                    window, t_window = [], time.perf_counter()
                if ckpt:
                    s.checkpoint()
                    last_ckpt = s.step
                if show:
                    preview()
                if stop.requested:
                    if last_ckpt != s.step:
                        s.checkpoint()
                    bar.close()
                    if cfg.log_with:
                        acc.end_training()  # flush the trackers' files
                    s.log.info(f"interrupted at step {s.step}; checkpoint saved. Rerun the same command to resume.")
                    raise Interrupted(f"interrupted at step {s.step}")
        bar.close()
        s.settle(window)
        if last_ckpt != s.step:
            s.checkpoint()
        preview()
        if acc.is_main_process:
            s.ema.copy_to(ema_model)
            with atomic_dir(export_dir) as tmp:
                export_fn(ema_model, tmp, s.step)
            s.log.info(f"export (EMA weights, step {s.step}): {export_dir}")
        if cfg.log_with:
            acc.end_training()
        acc.wait_for_everyone()
        return export_dir
