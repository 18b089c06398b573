"""The training loop every stage shares (teacher now, student later), built on accelerate.

Step-based and reproducible (after NVlabs/edm2):
  * the learning rate is a pure function of the step (linear warmup, then cosine);
  * the batch of step s is a pure function of (seed, s): epochs are seeded permutations of the
    rows, concatenated into one stream; process r takes its slice of the global batch;
  * randomness inside the loss (noise, label dropout) is drawn per row of the global batch
    from (seed, step): row i gets the same noise whatever the number of processes or
    accumulation rounds (see BatchRandom);
  * checkpoints (model, EMA, optimizer, step) are written atomically on a fixed cadence and on
    Ctrl-C / SIGTERM; a rerun of the same command resumes from the newest one, so a resumed run
    on the CPU ends with the same weights as an uninterrupted one.

A stage supplies the model, a loss function, an optional sampler for preview grids and an
export function; the loop owns everything else.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline import config as config_mod
from pipeline.errors import NFMError
from pipeline.io import atomic_dir, load_tensors, read_json, save_tensors, write_bytes, write_json

# (rank, world, per-process batch, first step) -> this process's batches for that step and the next ones
BatchStream = Callable[[int, int, int, int], Iterator[tuple[torch.Tensor, ...]]]
LossFn = Callable[[nn.Module, tuple[torch.Tensor, ...], "BatchRandom"], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000  # optimizer steps
    batch_size: int = 256  # global batch: all processes and accumulation rounds together
    lr: float = 5e-4  # peak learning rate
    warmup_steps: int = 200  # linear warmup from 0, then cosine to min_lr_ratio * lr
    min_lr_ratio: float = 0.01
    weight_decay: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    grad_accum: int = 1  # micro-batches per optimizer step
    ema_decay: float = 0.999  # EMA of weights; warmed up as min(decay, (1 + s) / (10 + s))
    mixed_precision: str = "no"  # no | bf16 (the flow's affine arithmetic stays float32)
    seed: int = 0
    log_every: int = 50
    sample_every: int = 500  # preview grid cadence (0: only at the end)
    ckpt_every: int = 500  # checkpoint cadence (0: only at the end and on interrupt)
    keep_ckpts: int = 2  # newest checkpoints kept
    num_workers: int = 0  # DataLoader workers (for lazily decoded data sets)


# Keys that may change between a run and its resumption.
RESUMABLE_CHANGES = {
    "train.steps",
    "train.log_every",
    "train.sample_every",
    "train.ckpt_every",
    "train.keep_ckpts",
    "train.num_workers",
}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to min_lr_ratio * lr at cfg.steps."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def derive_seed(*parts: Any) -> int:
    """A well-mixed 63-bit seed from any tuple, e.g. (seed, rank, step)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class BatchRandom:
    """Random numbers for rows [offset, offset + n) of one step's global batch of `total` rows.

    Each draw generates the values of the whole global batch from a generator seeded by
    (seed, step, draw index) and keeps this slice, so a row's noise does not depend on how
    the batch is split over processes and accumulation rounds. Draws must happen in the same
    order on every process (they do: every process runs the same loss code).
    """

    def __init__(self, seed: int, step: int, offset: int, n: int, total: int, device: torch.device | str = "cpu"):
        self.seed, self.step, self.offset, self.n, self.total = seed, step, offset, n, total
        self.device = torch.device(device)
        self._draws = 0

    def _generator(self) -> torch.Generator:
        self._draws += 1
        return torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, self.step, self._draws))

    def randn(self, *row_shape: int) -> torch.Tensor:
        """Standard normal, shape (n, *row_shape)."""
        full = torch.randn(self.total, *row_shape, generator=self._generator(), device=self.device)
        return full[self.offset : self.offset + self.n]

    def rand(self, *row_shape: int) -> torch.Tensor:
        """Uniform on [0, 1), shape (n, *row_shape)."""
        full = torch.rand(self.total, *row_shape, generator=self._generator(), device=self.device)
        return full[self.offset : self.offset + self.n]


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields, for steps start..end-1, this process's rows of the global batch of that step."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int, world: int, start: int, end: int):
        self.n, self.batch, self.seed, self.rank, self.world = n, global_batch, seed, rank, world
        self.start, self.end = start, end
        self._perm: tuple[int, torch.Tensor] | None = None

    def epoch_perm(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def global_rows(self, step: int) -> torch.Tensor:
        start, out = step * self.batch, []
        while sum(len(o) for o in out) < self.batch:
            pos = start + sum(len(o) for o in out)
            epoch, off = divmod(pos, self.n)
            out.append(self.epoch_perm(epoch)[off : off + self.batch - sum(len(o) for o in out)])
        return torch.cat(out)

    def __iter__(self):
        per = self.batch // self.world
        for s in range(self.start, self.end):
            yield self.global_rows(s)[self.rank * per : (self.rank + 1) * per].tolist()

    def __len__(self) -> int:
        return max(0, self.end - self.start)


class _RowTagged(torch.utils.data.Dataset):
    """Prepends the row indices to each fetched batch, so bad rows can be named."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, rows: list[int]):
        return (torch.as_tensor(rows), *self.ds.__getitems__(rows))


def check_finite(rows: torch.Tensor, batch: tuple[torch.Tensor, ...], what: str) -> None:
    for t in batch:
        if t.is_floating_point():
            bad = ~torch.isfinite(t).flatten(1).all(dim=1)
            if bad.any():
                raise NFMError(
                    f"{what}: rows {rows[bad][:8].tolist()} contain NaN or Inf "
                    f"({int(bad.sum())} in this batch); clean or drop them"
                )


def dataset_batches(dataset: torch.utils.data.Dataset, seed: int, end: int, num_workers: int = 0) -> BatchStream:
    """Batches of a map-style data set (``__getitems__``): step s reads the rows that StepBatchSampler
    gives (seed, s), so the stream resumes at any step; rows with NaN/Inf are named."""

    def stream(rank: int, world: int, per_process: int, start: int) -> Iterator[tuple[torch.Tensor, ...]]:
        sampler = StepBatchSampler(len(dataset), per_process * world, seed, rank, world, start, end)
        loader = torch.utils.data.DataLoader(
            _RowTagged(dataset), batch_sampler=sampler, num_workers=num_workers, collate_fn=lambda b: b
        )
        for rows, *batch in loader:
            check_finite(rows, batch, f"training data ({getattr(dataset, 'name', 'dataset')})")
            yield tuple(batch)

    return stream


class EMA:
    """Exponential moving average of a model's floating-point parameters, kept in float32."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, p in model.named_parameters():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - d)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> nn.Module:
        for k, p in model.named_parameters():
            p.copy_(self.shadow[k].to(p.dtype))
        return model


def force_cpu() -> bool:
    """Run on the CPU when asked (NFM_CPU=1) or when several processes run without a GPU, in which
    case accelerate needs cpu=True to join them with gloo (torchrun / accelerate launch on CPU)."""
    if os.environ.get("NFM_CPU", "") not in ("", "0"):
        return True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > 1 and not torch.cuda.is_available()


def process_state():
    """accelerate's process state (rank, world size, device), initialised consistently with train()."""
    from accelerate import PartialState

    return PartialState(cpu=force_cpu())


# ----------------------------------------------------------------------------- run directory


def setup_logger(run_dir: Path | None, name: str = "nfm", main: bool = True) -> logging.Logger:
    """Log to stdout (through tqdm, so bars stay intact) and to RUN/log.txt."""
    log = logging.getLogger(f"{name}.{run_dir}")
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if main else logging.WARNING)

    class TqdmHandler(logging.Handler):
        def emit(self, record):
            tqdm.write(self.format(record), file=sys.stdout)

    h = TqdmHandler()
    h.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(h)
    if run_dir is not None and main:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "log.txt")
        fh.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(fh)
    return log


def prepare_run_dir(run_dir: Path, resolved: dict[str, Any]) -> None:
    """Write RUN/config.json; refuse to resume a run dir whose config differs in a way that matters."""
    path = run_dir / "config.json"
    if path.exists():
        old = read_json(path, "run config")
        changed = [d for d in config_mod.diff(old, resolved) if d[0] not in RESUMABLE_CHANGES]
        if changed:
            lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed[:6])
            raise NFMError(
                f"run directory {run_dir} holds a run with a different config ({lines}). "
                "Resume it with its own config, or start a new run with another --run-dir"
            )
    write_json(path, resolved)


def list_checkpoints(run_dir: Path) -> list[Path]:
    d = run_dir / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step-"))


def _optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, extra = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v
            else:
                extra[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "extra": extra}


def _optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta.get("extra", {}).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: Path, step: int, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer, keep: int
) -> Path:
    path = run_dir / "checkpoints" / f"step-{step:07d}"
    opt_tensors, opt_meta = _optimizer_to_tensors(opt)
    with atomic_dir(path) as tmp:
        save_tensors(tmp / "model.safetensors", model.state_dict())
        save_tensors(tmp / "ema.safetensors", ema.shadow)
        save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        write_json(tmp / "state.json", {"step": step, "optimizer": opt_meta})
    for old in list_checkpoints(run_dir)[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer) -> int:
    state = read_json(path / "state.json", "checkpoint state")
    sd = load_tensors(path / "model.safetensors", "checkpoint weights")
    model.load_state_dict(sd)
    shadow = load_tensors(path / "ema.safetensors", "checkpoint EMA")
    if set(shadow) != set(ema.shadow):
        raise NFMError(f"checkpoint {path} EMA does not match the model; it belongs to another model")
    ema.shadow = {k: v.to(ema.shadow[k].device) for k, v in shadow.items()}
    opt.load_state_dict(_optimizer_from_tensors(load_tensors(path / "optimizer.safetensors"), state["optimizer"]))
    return int(state["step"])


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past `step` (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
    write_bytes(path, "".join(k + "\n" for k in keep).encode())


class _Stop:
    """Turns SIGINT/SIGTERM into a flag checked between steps (a second Ctrl-C aborts at once)."""

    def __init__(self):
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

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
    """Training stopped on request after saving a checkpoint."""


# ----------------------------------------------------------------------------- the loop


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
) -> Path:
    """Train to cfg.steps (resuming from RUN/checkpoints if present); returns RUN/export."""
    from accelerate import Accelerator

    if cfg.mixed_precision not in ("no", "bf16"):
        raise NFMError(f"train.mixed_precision must be 'no' or 'bf16', got {cfg.mixed_precision!r}")
    # bf16 autocast is applied by this loop, not by accelerate's process-wide (and, once set, fixed)
    # mixed-precision state: one process can then train a float32 teacher and a bf16 student in turn.
    acc = accelerator or Accelerator(cpu=force_cpu())
    autocast_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else None
    world, rank = acc.num_processes, acc.process_index
    if cfg.batch_size % (world * cfg.grad_accum):
        raise NFMError(
            f"train.batch_size={cfg.batch_size} must be divisible by processes x grad_accum "
            f"= {world} x {cfg.grad_accum}"
        )
    if batches is None:
        if dataset is None or len(dataset) == 0:
            raise NFMError("the training set is empty")
        batches = dataset_batches(dataset, cfg.seed, cfg.steps, cfg.num_workers)
    log = log or setup_logger(run_dir, main=acc.is_main_process)
    export_dir = run_dir / "export"
    if acc.is_main_process:
        prepare_run_dir(run_dir, resolved_config)
    acc.wait_for_everyone()

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    model, opt = acc.prepare(model, opt)  # moves the model to the device; the optimizer follows it
    raw_model = acc.unwrap_model(model)
    raw_opt = opt.optimizer if hasattr(opt, "optimizer") else opt
    ema = EMA(raw_model, cfg.ema_decay)
    step = 0
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            step = load_checkpoint(ckpt, raw_model, ema, raw_opt)
            log.info(f"resumed from {ckpt} (step {step})")
            break
        except NFMError as e:
            log.warning(f"skipping unreadable checkpoint {ckpt}: {e}")
    metrics_path = run_dir / "metrics.jsonl"
    if acc.is_main_process:
        _truncate_metrics(metrics_path, step)

    if step >= cfg.steps and (export_dir / "config.json").exists():
        log.info(f"run already complete ({step} steps); export: {export_dir}")
        return export_dir

    ema_model = copy.deepcopy(raw_model).eval().requires_grad_(False)
    per_process = cfg.batch_size // world
    micro = per_process // cfg.grad_accum
    stream = itertools.islice(batches(rank, world, per_process, step), max(0, cfg.steps - step))
    n_params = sum(p.numel() for p in raw_model.parameters())
    log.info(
        f"{desc}: {n_params / 1e6:.2f}M parameters, {world} process(es) on {acc.device}, "
        f"global batch {cfg.batch_size} ({micro} x {cfg.grad_accum} accum x {world}), "
        f"steps {step} -> {cfg.steps}"
    )

    def checkpoint() -> None:
        if acc.is_main_process:
            save_checkpoint(run_dir, step, raw_model, ema, raw_opt, cfg.keep_ckpts)
        acc.wait_for_everyone()

    def preview() -> None:
        if sample_fn is not None and acc.is_main_process:
            sample_fn(ema.copy_to(ema_model), run_dir / "samples" / f"step-{step:07d}.png")

    window: list[dict[str, float]] = []
    t_window = time.perf_counter()
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        desc=desc,
        disable=not acc.is_main_process,
        dynamic_ncols=True,
        unit="step",
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
    )
    last_ckpt = step
    with _Stop() as stop:
        for batch in stream:  # this process's part of the step's global batch
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            logs_acc: dict[str, float] = {}
            for m in range(cfg.grad_accum):
                part = tuple(t[m * micro : (m + 1) * micro].to(acc.device, non_blocking=True) for t in batch)
                sync = m == cfg.grad_accum - 1
                with nullcontext() if sync else acc.no_sync(model):  # all-reduce on the last round only
                    with torch.autocast(
                        acc.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
                    ):
                        rng = BatchRandom(
                            cfg.seed, step, rank * per_process + m * micro, micro, cfg.batch_size, acc.device
                        )
                        loss, logs = loss_fn(model, part, rng)
                    acc.backward(loss / cfg.grad_accum)
                for k, v in {"loss": float(loss.detach()), **logs}.items():
                    logs_acc[k] = logs_acc.get(k, 0.0) + v / cfg.grad_accum
            if cfg.grad_clip > 0:
                grad_norm = float(acc.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            else:
                grad_norm = float(
                    torch.linalg.vector_norm(
                        torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
                    )
                )
            if not math.isfinite(grad_norm) or not math.isfinite(logs_acc["loss"]):
                raise NFMError(
                    f"training diverged at step {step} (loss {logs_acc['loss']}, grad norm {grad_norm}). "
                    f"The newest checkpoint under {run_dir / 'checkpoints'} is intact: lower train.lr or raise "
                    "train.warmup_steps, and rerun"
                )
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(raw_model, step)
            step += 1
            window.append({**logs_acc, "grad_norm": grad_norm})
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in logs_acc.items()}, refresh=False)

            if step % cfg.log_every == 0 or step == cfg.steps:
                dt = time.perf_counter() - t_window
                means = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                if world > 1:
                    keys = sorted(means)
                    t = acc.reduce(torch.tensor([means[k] for k in keys], device=acc.device), "mean")
                    means = dict(zip(keys, t.tolist()))
                rec = {
                    "step": step,
                    **{k: round(v, 6) for k, v in means.items()},
                    "lr": lr,
                    "img_per_s": round(len(window) * cfg.batch_size / max(dt, 1e-9), 1),
                }
                if acc.is_main_process:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    parts = " ".join(f"{k} {v:.4f}" for k, v in means.items())
                    log.info(f"(step={step:07d}) {parts} lr {lr:.2e} img/s {rec['img_per_s']:.0f}")
                window, t_window = [], time.perf_counter()
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
                checkpoint()
                last_ckpt = step
            if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
                preview()
            if stop.requested:
                if last_ckpt != step:
                    checkpoint()
                bar.close()
                log.info(f"interrupted at step {step}; checkpoint saved. Rerun the same command to resume.")
                raise Interrupted(f"interrupted at step {step}")
    bar.close()
    if last_ckpt != step:
        checkpoint()
    preview()
    if acc.is_main_process:
        ema.copy_to(ema_model)
        with atomic_dir(export_dir) as tmp:
            export_fn(ema_model, tmp, step)
        log.info(f"export (EMA weights, step {step}): {export_dir}")
    acc.wait_for_everyone()
    return export_dir
