"""Classifier-free guidance (issue 25): is the per-class mismatch what guidance corrects, and does NFM keep its
lead when every model is guided?

The same evaluation `nfm run` makes with `eval.guidance=...` (pipeline.evaluate.student_guidance /
teacher_guidance), for the models of a finished run and with the NFM student from both priors: for every
training seed of a finished `nfm run` directory, the teacher (decode + denoise; from N(0, I) and from
its fitted prior), the NFM student (from N(0, I) and from its fitted prior) and every baseline student (from
N(0, I)) are sampled at each guidance weight w of `--weights` (students: v = (1 + w) v(x, t, y) - w v(x, t, -);
the teacher: its affine parameters guided the same way, `teacher.model.Guidance`) and each Euler count of
`--nfes`.

The held-out split is cut in two halves by a fixed permutation: the weight of each model and sampler is chosen
on the *validation* half (FID of eval.n samples from noise seed eval.seed + 1), and only the chosen weight and
w = 0 are scored on the *test* half (eval.n samples from noise seed eval.seed + 2). No number in the table has
seen the images it is scored against while its weight was chosen. The test half's FID is not the report's
(half the reference images): compare the rows of this table with each other, not with the report.

    python docs/results/beyond-teacher/guidance_study.py RUN_DIR [--out FILE.json] [--weights 0.5,1,2,3]
        [--nfes 1,2,8] [--seeds N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from prior_study import cell, load_run, students_of, teachers_of  # noqa: E402

from nfm.pairs.prior import teacher_prior  # noqa: E402
from nfm.pairs.reader import PairCache  # noqa: E402
from nfm.pipeline.evaluate import FITTED, held_out_halves, student_guidance, teacher_guidance  # noqa: E402
from nfm.pipeline.run import seeded  # noqa: E402
from nfm.student.train import load_student, student_prior  # noqa: E402
from nfm.teacher.export import load_teacher  # noqa: E402

BASELINES = ("independent", "minibatch-ot", "sd-ot", "reflow", "sb-cfm")


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--weights", default="0.5,1,2,3")
    ap.add_argument("--nfes", default="1,2,8")
    ap.add_argument("--seeds", type=int, help="only the first SEEDS training seeds (default: all the run's)")
    args = ap.parse_args()
    weights = tuple(float(w) for w in args.weights.split(",") if float(w) != 0.0)
    nfes = [int(k) for k in args.nfes.split(",")]
    cfg, on, _ = load_run(args.run)
    val, test = held_out_halves(on)
    students, teachers = students_of(args.run, cfg.student.train.steps), teachers_of(args.run)
    results: dict = {"run": str(args.run), "n": on.n, "extractor": on.extractor, "weights": [0.0, *weights],
                     "nfes": nfes, "halves": [len(val.reference), len(test.reference)], "seeds": []}  # fmt: skip
    for k in range(min(cfg.seeds, args.seeds or cfg.seeds)):
        seed = seeded(cfg, k).student.train.seed
        nfm_export = students[("nfm", seed)]
        cache = PairCache(load_student(nfm_export)[1]["flow"]["pairs"])
        teacher = load_teacher(teachers[cache.index["key_fields"]["teacher"]])
        fitted = teacher_prior(cache, teacher.fingerprint(), log=lambda *a: None)
        row: dict = {"seed": k}
        for sampler, c in teacher_guidance(teacher, on, weights, fitted=fitted).items():
            row[f"teacher, {sampler.replace(FITTED, ' from fitted')}"] = c
        models = [("nfm from N(0, I)", nfm_export, "gaussian"), ("nfm from fitted", nfm_export, "fitted")]
        models += [(c, students[(c, seed)], "gaussian") for c in BASELINES if (c, seed) in students]
        for name, export, choice in models:
            model, meta = load_student(export)
            prior = student_prior(export, meta, choice)
            for sampler, c in student_guidance(model, meta, on, weights, nfes, prior=prior).items():
                row[f"{name}, {sampler.replace('euler-', 'Euler ')}"] = c
        for key, c in row.items():
            if key != "seed":
                print(f"seed {k} {key:36s} val " + " ".join(f"w{float(w):g} {f:7.2f}" for w, f in c["val"].items())
                      + f" | test w0 {c['unguided']:7.2f}, w{c['best']:g} {c['guided']:7.2f}", flush=True)  # fmt: skip
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
        print(f"| {key} | {cell([x['unguided'] for x in rows])} | {cell([x['guided'] for x in rows])} "
              f"| {best} |")  # fmt: skip


if __name__ == "__main__":
    main()
