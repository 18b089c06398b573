"""Classifier-free guidance (issue 25): is the per-class mismatch what guidance corrects, and does NFM keep its
lead when every model is guided?

For every training seed of a finished `nfm run` directory, the teacher (decode + denoise; from N(0, I) and from
its fitted prior), the NFM student (from N(0, I) and from its fitted prior) and every baseline student (from
N(0, I)) are sampled at each guidance weight w of `--weights` (students: v = (1 + w) v(x, t, y) - w v(x, t, -);
the teacher: its affine parameters guided the same way, `teacher.model.Guidance`) and each Euler count of
`--nfes`.

The held-out split is cut in two halves by a fixed permutation: the weight of each model and sampler is chosen
on the *validation* half (FID of eval.n samples from noise seed eval.seed + 1), and only the chosen weight and
w = 0 are scored on the *test* half (eval.n samples from noise seed eval.seed + 2). No number in the table has
seen the images it is scored against while its weight was chosen. The test half's FID is not the report's
(half the reference images): compare the rows of this table with each other, not with the report.

    python docs/results/beyond-teacher/guidance_study.py RUN_DIR [--out FILE.json] [--weights 0,0.5,1,2,3]
        [--nfes 1,2,8] [--seeds N]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from prior_study import cell, load_run, students_of, teachers_of  # noqa: E402

from nfm.pairs.prior import teacher_prior  # noqa: E402
from nfm.pairs.reader import PairCache  # noqa: E402
from nfm.pipeline.core.sampling import sample_inputs  # noqa: E402
from nfm.pipeline.evaluate import EvalSet  # noqa: E402
from nfm.pipeline.run import seeded  # noqa: E402
from nfm.student.sampling import sample_ode, student_inputs  # noqa: E402
from nfm.student.train import load_student, student_prior  # noqa: E402
from nfm.teacher.export import load_teacher  # noqa: E402
from nfm.teacher.model import Guidance  # noqa: E402
from nfm.teacher.protocol import prior_std  # noqa: E402

BASELINES = ("independent", "minibatch-ot", "sd-ot", "reflow", "sb-cfm")
Sampler = Callable[[EvalSet, float, int], torch.Tensor]  # (where, weight, Euler steps) -> images in [-1, 1]


def halves(on: EvalSet, seed: int = 0) -> tuple[EvalSet, EvalSet]:
    """The held-out split in two halves (a fixed permutation): validation (noise seed + 1), test (+ 2)."""
    perm = torch.randperm(len(on.reference), generator=torch.Generator().manual_seed(seed))
    cut = len(perm) // 2

    def part(idx: torch.Tensor, k: int) -> EvalSet:
        return replace(on, reference=on.reference[idx], reference_labels=on.reference_labels[idx], seed=on.seed + k,
                       scorers={})  # fmt: skip

    return part(perm[:cut], 1), part(perm[cut:], 2)


def student_sampler(export: Path, prior_choice: str) -> Sampler:
    model, meta = load_student(export)
    prior = student_prior(export, meta, "fitted") if prior_choice == "fitted" else None
    classes = meta["model"]["num_classes"]

    def sample(on: EvalSet, w: float, steps: int) -> torch.Tensor:
        inputs = student_inputs(meta, on.n, seed=on.seed, labels_like=on.reference_labels, prior=prior)
        x = sample_ode(model, inputs.z, inputs.y, solver="euler", steps=steps, guidance=w, num_classes=classes)[0]
        return x.clamp(-1, 1)

    return sample


def teacher_sampler(teacher, cache: PairCache, prior_choice: str) -> Sampler:
    std = prior_std(teacher)
    if prior_choice == "fitted":
        tp = teacher_prior(cache, teacher.fingerprint(), log=lambda *a: None)
        prior = tp.scaled(tp.scale * std)
    else:
        prior = std
    shape, classes = tuple(teacher.image_shape), teacher.num_classes

    def sample(on: EvalSet, w: float, steps: int) -> torch.Tensor:
        inputs = sample_inputs(on.n, shape, classes, seed=on.seed, prior=prior, labels_like=on.reference_labels)
        g, out = Guidance(weight=w), []
        for i in range(0, on.n, 500):
            z, y = inputs.z[i : i + 500], inputs.y[i : i + 500]
            out.append(teacher.denoise(teacher.decode(z, y, guidance=g), y))
        return torch.cat(out).clamp(-1, 1)

    return sample


def choose(sample: Sampler, val: EvalSet, test: EvalSet, weights: list[float], steps: int) -> dict:
    """FID on the validation half at every weight; the best weight and w = 0 on the test half."""
    on_val = {w: val.fid_kid(sample(val, w, steps))["fid"] for w in weights}
    best = min(on_val, key=on_val.get)
    on_test = {w: test.fid_kid(sample(test, w, steps))["fid"] for w in sorted({0.0, best})}
    return {"val": on_val, "best": best, "test_unguided": on_test[0.0], "test_guided": on_test[best]}


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--weights", default="0,0.5,1,2,3")
    ap.add_argument("--nfes", default="1,2,8")
    ap.add_argument("--seeds", type=int, help="only the first SEEDS training seeds (default: all the run's)")
    args = ap.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    nfes = [int(k) for k in args.nfes.split(",")]
    if 0.0 not in weights:
        weights = [0.0] + weights
    cfg, on, _ = load_run(args.run)
    val, test = halves(on)
    students, teachers = students_of(args.run, cfg.student.train.steps), teachers_of(args.run)
    results: dict = {"run": str(args.run), "n": on.n, "extractor": on.extractor, "weights": weights, "nfes": nfes,
                     "halves": [len(val.reference), len(test.reference)], "seeds": []}  # fmt: skip
    for k in range(min(cfg.seeds, args.seeds or cfg.seeds)):
        seed = seeded(cfg, k).student.train.seed
        nfm_export = students[("nfm", seed)]
        cache = PairCache(load_student(nfm_export)[1]["flow"]["pairs"])
        teacher = load_teacher(teachers[cache.index["key_fields"]["teacher"]])
        models: dict[str, tuple[Sampler, list[int]]] = {
            f"teacher from {p}": (teacher_sampler(teacher, cache, p), [0]) for p in ("N(0, I)", "fitted")
        }
        models |= {f"nfm from {p}": (student_sampler(nfm_export, p), nfes) for p in ("N(0, I)", "fitted")}
        models |= {c: (student_sampler(students[(c, seed)], "N(0, I)"), nfes) for c in BASELINES
                   if (c, seed) in students}  # fmt: skip
        row: dict = {"seed": k}
        for name, (sample, counts) in models.items():
            for steps in counts:
                key = name if steps == 0 else f"{name}, Euler {steps}"
                row[key] = r = choose(sample, val, test, weights, steps)
                print(f"seed {k} {key:32s} val " + " ".join(f"w{w:g} {f:7.2f}" for w, f in r["val"].items())
                      + f" | test w0 {r['test_unguided']:7.2f}, w{r['best']:g} {r['test_guided']:7.2f}",
                      flush=True)  # fmt: skip
        results["seeds"].append(row)
        if args.out:  # after every seed: a long study keeps what it measured
            args.out.write_text(json.dumps(results, indent=1) + "\n")
    _table(results)


def _table(r: dict) -> None:
    print(f"\n| model, sampler (test half: {r['halves'][1]} images) | unguided | guided | weight chosen per seed |")
    print("|---|---|---|---|")
    for key in r["seeds"][0]:
        if key == "seed":
            continue
        rows = [s[key] for s in r["seeds"]]
        best = ", ".join(f"{x['best']:g}" for x in rows)
        print(f"| {key} | {cell([x['test_unguided'] for x in rows])} | {cell([x['test_guided'] for x in rows])} "
              f"| {best} |")  # fmt: skip


if __name__ == "__main__":
    main()
