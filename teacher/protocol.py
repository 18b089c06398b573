"""What stage two needs from a teacher, and how `--teacher SPEC` finds one.

Any object with these members is a teacher: this project's TarFlow, an imported ml-tarflow
checkpoint, or a user's own normalizing flow (`--teacher python:package.module:factory`).

SPEC forms accepted by `nfm pairs build --teacher`, `nfm run --from-teacher` and `nfm teacher import`:

    runs/teacher-digits                this project's teacher run or export directory
    ml-tarflow:PATH.pth                an apple/ml-tarflow state dict (architecture: --teacher-arch / file name)
    python:package.module:factory      factory() (or factory(**arch)) returns an object implementing Teacher
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from nfm.core.errors import NFMError


@runtime_checkable
class Teacher(Protocol):
    """A normalizing flow stage two can invert.

    The flow maps an image x (float, in [-1, 1], shape `image_shape`) and a label y to a latent z of the
    same shape, bijectively; its prior is N(0, diag(prior_std^2)) (prior_std optional, default 1). It was
    trained on x + noise_std * eps, eps ~ N(0, I).
    """

    image_shape: tuple[int, int, int]  # (channels, height, width)
    num_classes: int  # 0: unconditional; labels are int64 in [0, num_classes) and -1 for "no label"
    noise_std: float  # eta, the noise the flow was trained with (pairs encode x + eta * eps)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Data -> noise, deterministic: z = f(x | y), (b, *image_shape) -> (b, *image_shape)."""
        ...

    def decode(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Noise -> data, the inverse of `encode`: decode(encode(x, y), y) == x."""
        ...

    def fingerprint(self) -> str:
        """A short string that changes whenever the flow's function changes (config and weights):
        the teacher's identity in pair-cache keys."""
        ...

    # Optional members, used where present:
    #   log_prob(x, y) -> (b,) log-density in nats: `nfm teacher eval`, bits/dim in reports, the denoise step
    #   prior_std -> tensor broadcastable to image_shape: the prior's standard deviation per pixel (default 1)
    #   denoise(x, y) -> x: the score step applied after decoding (reports score decode and decode+denoise)


def check_teacher(obj: Any, where: str) -> Any:
    """Return obj if it implements `Teacher`, else one error naming every missing or malformed member."""
    problems = []
    for name in ("encode", "decode", "fingerprint"):
        if not callable(getattr(obj, name, None)):
            problems.append(f"method {name}()")
    shape = getattr(obj, "image_shape", None)
    if not (isinstance(shape, (tuple, list)) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
        problems.append(f"image_shape (a (channels, height, width) tuple of positive ints; got {shape!r})")
    nc = getattr(obj, "num_classes", None)
    if not (isinstance(nc, int) and nc >= 0):
        problems.append(f"num_classes (an int >= 0; got {nc!r})")
    eta = getattr(obj, "noise_std", None)
    if not (isinstance(eta, (int, float)) and eta >= 0):
        problems.append(f"noise_std (a float >= 0; got {eta!r})")
    if problems:
        raise NFMError(
            f"{where} is not a teacher: it lacks {'; '.join(problems)}. "
            "See teacher.protocol.Teacher for what stage two needs"
        )
    return obj


def teacher_device(teacher) -> torch.device:
    """Where a teacher's weights live (CPU for objects without parameters)."""
    params = getattr(teacher, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def prior_std(teacher) -> torch.Tensor:
    """The teacher's prior standard deviation on the CPU, broadcastable to an image batch (1 if it has none)."""
    std = getattr(teacher, "prior_std", None)
    return torch.ones(()) if std is None else torch.as_tensor(std).float().cpu()


@dataclass
class TeacherSpec:
    """A parsed --teacher value: kind is "export", "ml-tarflow" or "python"."""

    kind: str
    target: str
    arch: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.target if self.kind == "export" else f"{self.kind}:{self.target}"


def parse_arch(text: str | None) -> dict[str, Any]:
    """'patch_size=8,width=768,noise_std=0.07' -> {'patch_size': 8, 'width': 768, 'noise_std': 0.07}."""
    out: dict[str, Any] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise NFMError(f"--teacher-arch: expected key=value items separated by commas, got {part!r}")
        k, v = (s.strip() for s in part.split("=", 1))
        try:
            out[k] = int(v) if v.lstrip("-").isdigit() else float(v)
        except ValueError:
            out[k] = v
    return out


def parse_spec(spec: str, arch: str | dict | None = None) -> TeacherSpec:
    arch = parse_arch(arch) if isinstance(arch, str) or arch is None else dict(arch)
    for kind in ("ml-tarflow", "python"):
        if spec.startswith(kind + ":"):
            target = spec[len(kind) + 1 :]
            if not target:
                raise NFMError(f"--teacher {spec!r}: nothing after '{kind}:'")
            return TeacherSpec(kind, target, arch)
    if arch:
        raise NFMError("--teacher-arch applies to ml-tarflow: and python: teachers, not to this project's exports")
    return TeacherSpec("export", spec)


def load_python_teacher(target: str, arch: dict[str, Any] | None = None):
    """'package.module:factory' -> check_teacher(factory(**arch))."""
    mod_name, _, attr = target.partition(":")
    if not mod_name or not attr:
        raise NFMError(f"python teacher {target!r}: expected python:package.module:factory")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise NFMError(
            f"python teacher: cannot import {mod_name!r} ({e}); install it or put its directory on PYTHONPATH"
        ) from e
    factory = getattr(module, attr, None)
    if factory is None:
        raise NFMError(f"python teacher: module {mod_name!r} has no attribute {attr!r}")
    obj = factory
    if callable(factory) and (inspect.isfunction(factory) or inspect.isclass(factory) or inspect.ismethod(factory)):
        try:
            obj = factory(**(arch or {}))
        except TypeError as e:
            raise NFMError(f"python teacher: {target}({', '.join(arch or {})}) failed: {e}") from e
    return check_teacher(obj, f"python teacher {target!r}")


def load_teacher_spec(spec: str | TeacherSpec, device="cpu", arch: str | dict | None = None):
    """Any --teacher value -> (teacher in eval mode on `device`, info dict for the cache index)."""
    from nfm.teacher.export import export_info, load_teacher, resolve_export_dir

    s = spec if isinstance(spec, TeacherSpec) else parse_spec(spec, arch)
    if s.kind == "export":
        model = load_teacher(s.target, device)
        info = export_info(s.target)
        return model, {
            "kind": "tarflow",
            "source": str(resolve_export_dir(s.target).resolve()),
            "step": info.get("step"),
            "data": info.get("data"),
        }
    if s.kind == "ml-tarflow":
        from nfm.teacher.mltarflow import load_ml_tarflow

        model, arch_used = load_ml_tarflow(s.target, s.arch)
        return model.to(device).eval().requires_grad_(False), {
            "kind": "ml-tarflow",
            "source": s.label,
            "path": str(Path(s.target).expanduser().resolve()),
            "arch": arch_used,
        }
    teacher = load_python_teacher(s.target, s.arch)
    if isinstance(teacher, torch.nn.Module):
        teacher = teacher.to(device).eval().requires_grad_(False)
    return teacher, {"kind": "python", "source": s.label, "arch": s.arch}
