"""The prior ceiling (issue 25): where the NFM student of an `nfm run` starts from, and what that is worth.

For every training seed of a finished `nfm run` directory, the NFM student and its teacher are scored (FID of
eval.n samples against the held-out split, the run's own feature network, noise seed and labels) when started
from

    N(0, I)                 what every report did before the fitted prior
    fitted                  the Gaussian fitted per class to the pair cache's noise (pairs.prior): the default now
    held-out encodings      the teacher's encodings of the held-out images themselves (x + eta eps, the pairs'
                            recipe): the noise the student was trained on, for images it never saw. A ceiling for
                            any prior: it needs the held-out images

and, as a control with no teacher and no student, the same Gaussian fitted per class to the training *pixels*
(mean + OAS-shrunk covariance): what the Gaussian alone is worth. It also prints each cache's per-class noise
statistics (prior.json).

    python docs/results/beyond-teacher/prior_study.py RUN_DIR [RUN_DIR...] [--out FILE.json] [--nfes 1,2,4,8]

Several run directories are the seeds of one study trained apart (`nfm run --seeds 1 --first-seed K`): their
settings must be the same but for the seeds. The results are written to --out after every seed; run again with
the same --out (say, after `--seeds 3` on the same run directory), the seeds already there for the same student
export are kept, not measured again.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from nfm.core.config import from_dict
from nfm.core.data import load_data
from nfm.core.io import read_json
from nfm.core.prior import FittedPrior, Moments
from nfm.core.sampling import sample_inputs
from nfm.pairs.lookup import find_cache
from nfm.pairs.prior import PriorConfig, fit_prior, teacher_prior
from nfm.pairs.reader import PairCache
from nfm.pipeline.aggregate import interval
from nfm.pipeline.evaluate import EvalSet, default_extractor
from nfm.pipeline.run import RunConfig, seed_range, seeded
from nfm.student.sampling import sample_ode, student_inputs
from nfm.student.train import load_student, student_prior
from nfm.teacher.export import load_teacher
from nfm.teacher.protocol import prior_std


def cell(values: list[float], digits: int = 2) -> str:
    """mean ± the half-width of its 95 % interval over the seeds (the mean alone for one seed)."""
    mean, ci = interval(values)
    return f"{mean:.{digits}f}" if ci is None else f"{mean:.{digits}f} ± {ci:.{digits}f}"


def save(results: dict, out: Path | None) -> None:
    """The study's results as JSON at `out` (after every seed: a long study keeps what it measured)."""
    if out:
        out.write_text(json.dumps(results, indent=1) + "\n")


def euler_head(first: str, nfes: list[int]) -> None:
    """A markdown table's head: `first`, then a column an Euler count."""
    print(f"\n| {first} | " + " | ".join(f"Euler {s}" for s in nfes) + " |")
    print("|---|" + "---|" * len(nfes))


def euler_fids(model, meta: dict, z: torch.Tensor, y: torch.Tensor, nfes: list[int], on: EvalSet) -> dict[int, float]:
    """FID of a student's Euler samples from (z, y) at each step count."""
    out = {}
    for steps in nfes:
        xs = sample_ode(model, z, y, solver="euler", steps=steps, num_classes=meta["model"]["num_classes"])[0]
        out[steps] = on.fid_kid(xs.clamp(-1, 1))["fid"]
    return out


def students_of(run: Path, steps: int) -> dict[tuple[str, int], Path]:
    """The student export of each coupling and training seed (its train.seed) trained the run's `steps`."""
    out = {}
    for cfg_path in sorted((run / "students").glob("*/config.json")):
        c = read_json(cfg_path, "student config")
        if c["train"]["steps"] == steps and (cfg_path.parent / "export" / "config.json").is_file():
            out[(c["flow"]["coupling"], c["train"]["seed"])] = cfg_path.parent / "export"
    return out


def _pairwise(teacher, cache: PairCache, exports: dict[str, Path], on: EvalSet, nfes: list[int]) -> dict:
    """For the same noise, the RMS per-pixel distance between a student's sample and its teacher's decode +
    denoise of that noise (in the teacher's latent units: noise x sigma_f x prior_std), per Euler count: does the
    student reproduce the teacher's coupling, or only its distribution?"""
    out: dict = {}
    scale = prior_std(teacher) * cache.sigma_f
    for name, export in exports.items():
        model, meta = load_student(export)
        fitted = student_prior(export, meta)
        for prior_name, prior in [("N(0, I)", None)] + ([("fitted", fitted)] if fitted is not None else []):
            inputs = student_inputs(meta, on.n, seed=on.seed, labels_like=on.reference_labels, prior=prior)
            z, y = inputs.z, inputs.y
            xt = torch.cat([teacher.denoise(teacher.decode(z[i : i + 500] * scale, y[i : i + 500]), y[i : i + 500])
                            for i in range(0, on.n, 500)]).clamp(-1, 1)  # fmt: skip
            row = out.setdefault(f"{name} from {prior_name}", {})
            for steps in nfes:
                xs = sample_ode(model, z, y, steps=steps, num_classes=meta["model"]["num_classes"])[0].clamp(-1, 1)
                row[steps] = float((xs - xt).flatten(1).pow(2).mean(1).sqrt().mean())
            print(f"  pairwise {name} from {prior_name}: " + " ".join(f"E{s} {d:.3f}" for s, d in row.items()))
    return out


def load_run(run: Path) -> tuple[RunConfig, EvalSet, tuple[torch.Tensor, torch.Tensor]]:
    """A finished `nfm run` directory's config, the evaluation set its report used and the training images
    with their labels."""
    saved = read_json(run / "config.json", "run config")  # the run's config, with the preset and teacher
    cfg = from_dict(RunConfig, {k: v for k, v in saved.items() if k not in ("preset", "from_teacher")})
    ev, data_cfg = cfg.eval, cfg.teacher.data
    reference, ref_labels = load_data(data_cfg, "test").tensors()
    train_images, train_labels = load_data(data_cfg, "train").tensors()
    on = EvalSet(reference, ref_labels, train_images, ev.extractor or default_extractor(data_cfg.name), ev.n, ev.seed)
    return cfg, on, (train_images, train_labels)


def _same_study(run: Path, cfg: RunConfig) -> RunConfig:
    """`run`'s config, refused unless it is `cfg`'s but for its seeds (the seeds of one study trained apart)."""
    saved = read_json(run / "config.json", "run config")
    other = from_dict(RunConfig, {k: v for k, v in saved.items() if k not in ("preset", "from_teacher")})
    if replace(other, seeds=cfg.seeds, first_seed=cfg.first_seed) != cfg:
        raise SystemExit(
            f"{run}: its settings differ from the first run's beyond --seeds/--first-seed; "
            "give the runs of one study only"
        )
    return other


def teachers_of(run: Path) -> dict[str, Path]:
    return {load_teacher(d).fingerprint(): d for d in sorted(run.glob("teacher-*/export"))}


def _held_out_noise(teacher, cache: PairCache, images: torch.Tensor, labels: torch.Tensor, n: int, seed: int):
    """n held-out images (cycled), noised as the pairs were (x + eta eps), encoded: z / (prior_std sigma_f)."""
    idx = torch.arange(n) % len(images)
    g = torch.Generator().manual_seed(seed)
    x = images[idx] + cache.index["noise_std"] * torch.randn(images[idx].shape, generator=g)
    y = labels[idx]
    z = torch.cat([teacher.encode(x[i : i + 500], y[i : i + 500]) for i in range(0, n, 500)])
    return (z.float() / (prior_std(teacher) * cache.sigma_f)), y


def _pixel_gaussian(images: torch.Tensor, labels: torch.Tensor, classes: int) -> FittedPrior:
    m = Moments.zeros(classes + 1, images[0].numel())
    m.add(images, labels)
    m.pool_last()
    return FittedPrior.from_moments(m, tuple(images.shape[1:]))[0]


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--nfes", default="1,2,4,8")
    args = ap.parse_args()
    nfes = [int(k) for k in args.nfes.split(",")]
    args.runs = [r.resolve() for r in args.runs]  # a seed kept in --out is found whatever the working folder
    cfg, on, (train_images, train_labels) = load_run(args.runs[0])
    ev, reference, ref_labels = cfg.eval, on.reference, on.reference_labels
    results: dict = {"run": [str(r) for r in args.runs], "n": ev.n, "extractor": on.extractor, "nfes": nfes}
    results["seeds"] = []
    done = _measured(args.out, results)

    classes = int(ref_labels.max()) + 1
    pixel = _pixel_gaussian(train_images, train_labels, classes)
    x = sample_inputs(ev.n, tuple(reference.shape[1:]), classes, seed=ev.seed, prior=pixel,
                      labels_like=ref_labels).z.clamp(-1, 1)  # fmt: skip
    results["pixel_gaussian"] = on.fid_kid(x)["fid"]
    print(f"per-class Gaussian of the training pixels: FID {results['pixel_gaussian']:.3f}", flush=True)

    found = {r: (students_of(r, cfg.student.train.steps), teachers_of(r)) for r in args.runs}  # each run once
    for run, k in [(r, k) for r in args.runs for k in seed_range(_same_study(r, cfg))]:
        sc = seeded(cfg, k)
        students, teachers = found[run]
        export = students[("nfm", sc.student.train.seed)]
        if (k, str(export)) in done:
            results["seeds"].append(done[k, str(export)])
            print(f"seed {k}: kept from {args.out}", flush=True)
            continue
        model, meta = load_student(export)
        cache = PairCache(find_cache(meta["flow"]["pairs"]))
        teacher = load_teacher(teachers[cache.index["key_fields"]["teacher"]])
        _, prior_meta = fit_prior(cache, PriorConfig(), log=lambda *a: None)
        row: dict = {"seed": k, "student": str(export), "cache": cache.key, "prior": prior_meta["components"]}
        fitted = student_prior(export, meta, "fitted")
        noise, y = _held_out_noise(teacher, cache, reference, ref_labels, ev.n, ev.seed)
        starts = {
            "N(0, I)": student_inputs(meta, ev.n, seed=ev.seed, labels_like=ref_labels),
            "fitted": student_inputs(meta, ev.n, seed=ev.seed, labels_like=ref_labels, prior=fitted),
        }
        starts = {name: (i.z, i.y) for name, i in starts.items()} | {"held-out encodings": (noise, y)}
        for name, (z, yy) in starts.items():
            row[name] = euler_fids(model, meta, z, yy, nfes, on)
            print(f"seed {k} NFM from {name:20s} " + " ".join(f"E{s} {f:7.3f}" for s, f in row[name].items()),
                  flush=True)  # fmt: skip
        tp = teacher_prior(cache, teacher.fingerprint(), log=lambda *a: None)
        for name, p in (("N(0, I)", prior_std(teacher)), ("fitted", tp.scaled(tp.scale * prior_std(teacher)))):
            inputs = sample_inputs(ev.n, tuple(reference.shape[1:]), classes, seed=ev.seed, prior=p,
                                   labels_like=ref_labels)  # fmt: skip
            xs = torch.cat([teacher.denoise(teacher.decode(inputs.z[i : i + 500], inputs.y[i : i + 500]),
                                            inputs.y[i : i + 500]) for i in range(0, ev.n, 500)])  # fmt: skip
            row[f"teacher {name}"] = on.fid_kid(xs.clamp(-1, 1))["fid"]
            print(f"seed {k} teacher (decode + denoise) from {name}: FID {row[f'teacher {name}']:.3f}", flush=True)
        seed = sc.student.train.seed
        exports = {c: students[(c, seed)] for c in ("nfm", "independent", "minibatch-ot", "sd-ot")
                   if (c, seed) in students}  # fmt: skip
        row["pairwise"] = _pairwise(teacher, cache, exports, on, nfes)
        results["seeds"].append(row)
        save(results, args.out)
    _table(results)


def _measured(out: Path | None, results: dict) -> dict:
    """The seed rows of an earlier run of this study at `out` with the same settings, by (seed, student)."""
    if not out or not out.is_file():
        return {}
    old = json.loads(out.read_text())
    if any(old.get(k) != results[k] for k in ("n", "extractor", "nfes")):
        return {}
    return {(row["seed"], row["student"]): _int_keys(row) for row in old["seeds"]}


def _int_keys(d):
    """A row read back from JSON with its Euler counts as ints again (JSON keeps only string keys)."""
    if not isinstance(d, dict):
        return d
    return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v) for k, v in d.items()}


def _table(r: dict) -> None:
    euler_head("NFM student started from", r["nfes"])
    for name in ("N(0, I)", "fitted", "held-out encodings"):
        cells = [cell([s[name][steps] for s in r["seeds"]]) for steps in r["nfes"]]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for name in ("N(0, I)", "fitted"):
        print(f"| teacher decode + denoise from {name} | {cell([s[f'teacher {name}'] for s in r['seeds']])} |")
    print(f"| per-class Gaussian of the training pixels (no teacher, no student) | {r['pixel_gaussian']:.2f} |")
    print("\n| RMS per pixel, student sample vs teacher decode + denoise of the same noise | "
          + " | ".join(f"Euler {s}" for s in r["nfes"]) + " |")  # fmt: skip
    print("|---|" + "---|" * len(r["nfes"]))
    for name in r["seeds"][0]["pairwise"]:
        cells = [cell([s["pairwise"][name][steps] for s in r["seeds"]], 3) for steps in r["nfes"]]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
