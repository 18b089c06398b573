"""Named presets: one dict per preset and stage, layered under config files and overrides."""

from __future__ import annotations

from typing import Any

from nfm.core.errors import NFMError
from nfm.student.names import STUDENT_SIZES
from nfm.teacher.sizes import TARFLOW_SIZES


def _gpu(model: dict[str, Any], size: int, lr: float) -> dict[str, Any]:
    """A user's own RGB images at size x size on one GPU (bf16): set data.name (teacher.data.name in a run)."""
    return {
        "model": model,
        "data": {"name": "", "image_size": size, "channels": 3},
        "train": {
            "steps": 100_000,
            "batch_size": 256,
            "lr": lr,
            "warmup_steps": 2000,
            "mixed_precision": "bf16",
            "log_every": 200,
            "sample_every": 5000,
            "ckpt_every": 2000,
            "ema_decay": 0.9999,
            "num_workers": 4,
        },
    }


def _gpu_teacher(size: int) -> dict[str, Any]:
    return _gpu({**TARFLOW_SIZES[f"img{size}"], "noise_std": 0.05}, size, 3e-4)


def _gpu_student(size: int) -> dict[str, Any]:
    return _gpu(dict(STUDENT_SIZES["SiT-B/2" if size == 32 else "SiT-B/4"]), size, 2e-4)


def _train(
    steps: int, batch: int, lr: float, warmup: int, log_every: int, sample_every: int, ckpt_every: int, ema: float
) -> dict[str, Any]:
    """A preset's train section (the CPU presets differ only in these)."""
    return {
        "steps": steps,
        "batch_size": batch,
        "lr": lr,
        "warmup_steps": warmup,
        "log_every": log_every,
        "sample_every": sample_every,
        "ckpt_every": ckpt_every,
        "ema_decay": ema,
    }


TEACHER_PRESETS: dict[str, dict[str, Any]] = {
    # seconds on a CPU: for tests and smoke runs
    "tiny": {
        "model": {**TARFLOW_SIZES["tiny"], "noise_std": 0.1},
        "data": {"name": "digits"},
        "train": _train(20, 32, 1e-3, 5, 5, 10, 10, 0.9),
        "sample": {"n": 20},
    },
    # 8x8 digits: the CPU demo. Per CPU minute a narrow model, small batches and a high learning rate
    # gave the best samples (teacher FID 4.7 in 4.8 min vs 15.8 in 7.4 min for width 128, batch 128, lr 5e-4)
    "digits": {
        "model": {**TARFLOW_SIZES["digits8-S"], "noise_std": 0.1},
        "data": {"name": "digits"},
        "train": _train(9000, 64, 2e-3, 200, 100, 3000, 1000, 0.999),
    },
    # 28x28 Fashion-MNIST (Debian's dataset-fashion-mnist). Tuned per CPU minute like digits
    # (docs/results/fashion-mnist/README.md): a narrow TarFlow (width 64), small batches, a high learning rate
    "fashion-mnist": {
        "model": {**TARFLOW_SIZES["mnist28-S"], "noise_std": 0.1},
        "data": {"name": "fashion-mnist"},
        "train": _train(3000, 64, 2e-3, 200, 100, 1000, 500, 0.999),
    },
    # the fashion-mnist preset on one GPU, 20x its training images (batch 8x, steps 2.5x), bf16. Sized from the
    # H200 figures of benchmarks/results/*-cuda.md (a launch-bound step of 16-17 ms); not yet run on a GPU
    "fashion-mnist-gpu": {
        "model": {**TARFLOW_SIZES["mnist28-S"], "noise_std": 0.1},
        "data": {"name": "fashion-mnist"},
        "train": {**_train(7500, 512, 2e-3, 500, 250, 2500, 2500, 0.9995), "mixed_precision": "bf16"},
    },
    # a user's own 32x32 / 64x64 RGB images on one GPU: nfm teacher train --preset gpu32 data.name=DIR
    "gpu32": _gpu_teacher(32),
    "gpu64": _gpu_teacher(64),
}


STUDENT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": dict(STUDENT_SIZES["SiT-tiny"]),
        "data": {"name": "digits"},
        "flow": {"sdot": {"steps": 20, "batch_size": 128, "check": 8}},  # a toy fit: seconds, not minutes
        "train": _train(20, 32, 1e-3, 5, 5, 10, 10, 0.9),
        "sample": {"n": 20, "steps": 2},
    },
    "digits": {
        "model": dict(STUDENT_SIZES["conv-S"]),
        "data": {"name": "digits"},
        "train": _train(1000, 128, 1e-3, 100, 100, 1000, 500, 0.999),
    },
    # 28x28 on a CPU: a small transformer; the semidiscrete-OT fit shortened to ~2 minutes (10 classes x 6,000)
    "fashion-mnist": {
        "model": dict(STUDENT_SIZES["SiT-XS/4"]),
        "data": {"name": "fashion-mnist"},
        "flow": {"sdot": {"steps": 300, "batch_size": 512}},
        "train": _train(1500, 64, 1e-3, 100, 100, 500, 500, 0.999),
    },
    "fashion-mnist-gpu": {
        "model": dict(STUDENT_SIZES["SiT-XS/4"]),
        "data": {"name": "fashion-mnist"},
        "flow": {"sdot": {"steps": 1500, "batch_size": 2048}},
        "train": {**_train(3750, 512, 1e-3, 250, 250, 1250, 1250, 0.9995), "mixed_precision": "bf16"},
    },
    # unpaired translation MNIST (mnist-5k) -> Fashion-MNIST on a CPU budget: a small transformer, from a data source
    "mnist-to-fashion": {
        "model": dict(STUDENT_SIZES["SiT-XS/4"]),
        "data": {"name": "fashion-mnist"},
        "flow": {"source": "data:mnist-5k"},
        "train": _train(1500, 64, 1e-3, 100, 100, 500, 500, 0.999),
    },
    "gpu32": _gpu_student(32),
    "gpu64": _gpu_student(64),
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
    # (reflow, nfm-reflow and sb add 3-7 minutes each on 2 cores: run.couplings=nfm,...,sb,reflow,nfm-reflow)
    # (the dopri5 row at rtol = atol = 1e-4: 80-86 NFE where 1e-5 takes 230-260, FID within 0.016; eval_bench.py)
    "digits": _run(
        "digits",
        "digits",
        pairs={"views": 32},
        couplings=("nfm", "independent", "minibatch-ot", "sd-ot"),
        eval={"dopri5_tol": 1e-4},
    ),
    # 28x28 Fashion-MNIST: about an hour a seed on 2 CPU cores, evaluation included
    "fashion-mnist": _run(
        "fashion-mnist", "fashion-mnist", pairs={"views": 2}, couplings=("nfm", "independent", "minibatch-ot", "sd-ot")
    ),
    # the same on one GPU, three seeds, teacher and students on 20x the images (batch 512, bf16; not yet measured
    # on a GPU: benchmarks/gpu_pass.sh runs it when a device is lent)
    "fashion-mnist-gpu": _run(
        "fashion-mnist-gpu",
        "fashion-mnist-gpu",
        pairs={"views": 4},
        couplings=("nfm", "independent", "minibatch-ot", "sd-ot"),
        seeds=3,
    ),
    # OT-CFM from a data source: MNIST digits -> Fashion-MNIST, no teacher (independent / minibatch-ot / sb)
    "mnist-to-fashion": {
        "teacher": {"data": {"name": "fashion-mnist", "use_labels": False}},  # an unconditional map
        "student": STUDENT_PRESETS["mnist-to-fashion"],
        "couplings": ("independent", "minibatch-ot", "sb"),
        "eval": {"teacher": False, "euler_nfes": (1, 2, 4, 8), "dopri5": False, "higher_steps": 4},
    },
    # a user's own images on one GPU (Inception-v3 FID: pip install -e '.[inception]'):
    # nfm run --preset gpu32 teacher.data.name=DIR
    "gpu32": _run("gpu32", "gpu32", pairs={"views": 1}, eval={"n": 10000, "extractor": "inception-v3-fid-helper"}),
    "gpu64": _run("gpu64", "gpu64", pairs={"views": 1}, eval={"n": 10000, "extractor": "inception-v3-fid-helper"}),
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


def _kt(data: dict[str, Any], teacher: dict[str, Any], t_train: dict[str, Any], student_width: int,
        s_train: dict[str, Any], augment: dict[str, Any], **extra: Any) -> dict[str, Any]:  # fmt: skip
    """An `nfm kt run` preset: the classifier teacher, its logit cache and the KT students."""
    return {
        # label smoothing keeps the teacher's logits finite in scale: its soft targets stay informative
        "teacher": {"data": data, "model": teacher, "train": t_train, "augment": augment, "label_smoothing": 0.1},
        "pairs": {"augment": augment, "views": extra.pop("views", 2)},
        "student": {"model": {"width": student_width}, "train": s_train},
        **extra,
    }


KT_PRESETS: dict[str, dict[str, Any]] = {
    # seconds: for tests
    "tiny": _kt(
        {"name": "digits"}, {"width": 4, "blocks": 1}, _train(30, 64, 3e-3, 5, 10, 0, 30, 0.9),
        4, _train(30, 64, 3e-3, 5, 10, 0, 30, 0.9), {"shift": 1, "flip": False}, seeds=1, eval_steps=(1, 2),
    ),
    # 8x8 digits (flips would change a digit): minutes on 2 cores
    "digits": _kt(
        {"name": "digits"}, {"width": 16, "blocks": 1}, _train(1500, 64, 3e-3, 100, 250, 0, 500, 0.999),
        8, _train(1500, 64, 3e-3, 100, 250, 0, 500, 0.999), {"shift": 1, "flip": False}, views=4,
    ),
    # 28x28 Fashion-MNIST: a small ResNet teacher (78k parameters), a 3.8k-parameter student (9k with the meta-encoder),
    # trained 6,000 steps: at 2,000 every student is still far from converged and the gaps between methods mislead
    # (docs/results/fm-kt/fashion-mnist). Rows: the (none, kd, fm-kt), KD with DIST, and OFM-KT, the same
    # network as FM-KT without a teacher.
    "fashion-mnist": _kt(
        {"name": "fashion-mnist"}, {"width": 16, "blocks": 1}, _train(1500, 128, 2e-3, 100, 250, 0, 500, 0.999),
        8, _train(6000, 128, 3e-3, 100, 250, 0, 500, 0.999), {"shift": 2, "flip": True},
        methods=("none", "kd", "kd+kd_loss=dist", "fm-kt", "ofm-kt+label_smoothing=0.1"),
    ),
}  # fmt: skip


def kt_preset(name: str) -> dict[str, Any]:
    return _lookup(KT_PRESETS, name, "preset")
