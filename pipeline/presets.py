"""Named presets: one dict per preset and stage, layered under config files and overrides."""

from __future__ import annotations

from typing import Any

from pipeline.errors import NFMError
from student.models import STUDENT_SIZES
from teacher.model import TARFLOW_SIZES

TEACHER_PRESETS: dict[str, dict[str, Any]] = {
    # seconds on a CPU: for tests and smoke runs
    "tiny": {
        "model": {**TARFLOW_SIZES["tiny"], "noise_std": 0.1},
        "data": {"name": "digits"},
        "train": {
            "steps": 20,
            "batch_size": 32,
            "lr": 1e-3,
            "warmup_steps": 5,
            "log_every": 5,
            "sample_every": 10,
            "ckpt_every": 10,
            "ema_decay": 0.9,
        },
        "sample": {"n": 20},
    },
    # 8x8 digits: the CPU demo
    "digits": {
        "model": {**TARFLOW_SIZES["digits8"], "noise_std": 0.1},
        "data": {"name": "digits"},
        "train": {
            "steps": 3000,
            "batch_size": 128,
            "lr": 5e-4,
            "warmup_steps": 200,
            "log_every": 100,
            "sample_every": 1000,
            "ckpt_every": 500,
            "ema_decay": 0.999,
        },
    },
    # 28x28 Fashion-MNIST (Debian's dataset-fashion-mnist): about 1.5 hours on 2 CPU cores
    "fashion-mnist": {
        "model": {**TARFLOW_SIZES["mnist28"], "noise_std": 0.05},
        "data": {"name": "fashion-mnist"},
        "train": {
            "steps": 10000,
            "batch_size": 128,
            "lr": 5e-4,
            "warmup_steps": 500,
            "log_every": 100,
            "sample_every": 1000,
            "ckpt_every": 500,
            "ema_decay": 0.9995,
        },
    },
}


STUDENT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": dict(STUDENT_SIZES["SiT-tiny"]),
        "data": {"name": "digits"},
        "train": {
            "steps": 20,
            "batch_size": 32,
            "lr": 1e-3,
            "warmup_steps": 5,
            "log_every": 5,
            "sample_every": 10,
            "ckpt_every": 10,
            "ema_decay": 0.9,
        },
        "sample": {"n": 20, "steps": 2},
    },
    "digits": {
        "model": dict(STUDENT_SIZES["conv-S"]),
        "data": {"name": "digits"},
        "train": {
            "steps": 2000,
            "batch_size": 256,
            "lr": 1e-3,
            "warmup_steps": 200,
            "log_every": 100,
            "sample_every": 1000,
            "ckpt_every": 500,
            "ema_decay": 0.999,
        },
    },
    "fashion-mnist": {
        "model": dict(STUDENT_SIZES["SiT-S/4"]),
        "data": {"name": "fashion-mnist"},
        "train": {
            "steps": 20000,
            "batch_size": 256,
            "lr": 5e-4,
            "warmup_steps": 1000,
            "log_every": 100,
            "sample_every": 2000,
            "ckpt_every": 1000,
            "ema_decay": 0.9995,
        },
    },
}


def _run(teacher: str, student: str, **extra: Any) -> dict[str, Any]:
    return {"teacher": TEACHER_PRESETS[teacher], "student": STUDENT_PRESETS[student], **extra}


RUN_PRESETS: dict[str, dict[str, Any]] = {
    # seconds: for tests
    "tiny": _run(
        "tiny",
        "tiny",
        eval={"n": 100, "euler_nfes": (1, 2), "higher_steps": 1, "straightness_steps": 4, "dopri5": False},
    ),
    # the CPU demo: 8x8 digits
    "digits": _run("digits", "digits", pairs={"views": 32}),
    # 28x28 Fashion-MNIST: hours on a CPU, minutes on a GPU
    "fashion-mnist": _run("fashion-mnist", "fashion-mnist", pairs={"views": 2}),
}


def _lookup(table: dict[str, Any], name: str, what: str) -> Any:
    if name not in table:
        raise NFMError(f"unknown {what} {name!r}; choose one of {', '.join(table)}")
    return table[name]


def teacher_preset(name: str) -> dict[str, Any]:
    return _lookup(TEACHER_PRESETS, name, "preset")


def student_preset(name: str) -> dict[str, Any]:
    return _lookup(STUDENT_PRESETS, name, "preset")


def run_preset(name: str) -> dict[str, Any]:
    return _lookup(RUN_PRESETS, name, "preset")


def size_overrides(name: str) -> dict[str, Any]:
    return {"model": dict(_lookup(TARFLOW_SIZES, name, "TarFlow size"))}


def student_size_overrides(name: str) -> dict[str, Any]:
    return {"model": dict(_lookup(STUDENT_SIZES, name, "student size"))}
