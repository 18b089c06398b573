"""A richer prior (issue 25): does a Gaussian *mixture* per class, fitted to the pair cache's noise, close the gap
between the fitted Gaussian and the teacher's encodings of held-out images?

For every training seed of a finished `nfm run` directory: each class's noise rows of the NFM student's pair
cache are split 90 / 10 (a fixed permutation); mixtures of k = 1, 2, 4, ... full-covariance Gaussians (k-means
start, EM in float64, every component's covariance OAS-shrunk as the fitted prior's is) are fitted on the 90 %
and scored by their log-likelihood of the held-out 10 % (nats per dimension; k = 1 is the fitted Gaussian). The
k with the best held-out likelihood is kept per class, and the NFM student is sampled from that mixture (the
component drawn per sample from a fixed generator) and, with the same eps, from the k = 1 fit: FID at each Euler
count, as in prior_study.py.

    python docs/results/beyond-teacher/mixture_study.py RUN_DIR [RUN_DIR...] [--out FILE.json] [--ks 1,2,4]
        [--iters 20] [--nfes 1,2,4,8] [--seeds N]

Several run directories are the seeds of one study trained apart (as in prior_study.py). The results are written
to --out after every seed; run again with the same --out, the seeds already there (same settings, same pair
cache) are kept, not measured again.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from prior_study import _int_keys, _same_study, cell, euler_fids, euler_head, load_run, save, students_of  # noqa: E402

from nfm.core.prior import oas  # noqa: E402
from nfm.pairs.lookup import find_cache  # noqa: E402
from nfm.pairs.prior import read_noise  # noqa: E402
from nfm.pairs.reader import PairCache  # noqa: E402
from nfm.pipeline.run import seed_range, seeded  # noqa: E402
from nfm.student.paths import ProbPath  # noqa: E402
from nfm.student.sampling import student_inputs  # noqa: E402
from nfm.student.train import load_student  # noqa: E402


class Mixture:
    """A mixture of full-covariance Gaussians: weights (k,), means (k, D), Cholesky factors (k, D, D)."""

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, chols: torch.Tensor):
        self.weights, self.means, self.chols = weights, means, chols

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """(n, k): log w_j + log N(x | mean_j, L_j L_j^T)."""
        d = x.shape[1]
        out = []
        for w, m, chol in zip(self.weights, self.means, self.chols):
            sol = torch.linalg.solve_triangular(chol, (x - m).T, upper=False)
            logdet = torch.log(torch.diagonal(chol)).sum()
            out.append(math.log(float(w)) - 0.5 * sol.pow(2).sum(0) - logdet - 0.5 * d * math.log(2 * math.pi))
        return torch.stack(out, 1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self.component_log_prob(x), 1)

    def transform(self, eps: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """eps (n, D) standard normal -> mixture samples; the component of each row drawn from g."""
        j = torch.multinomial(self.weights.float(), len(eps), replacement=True, generator=g)
        return self.means[j] + torch.einsum("nij,nj->ni", self.chols[j], eps.double())


def fit_mixture(x: torch.Tensor, k: int, iters: int, seed: int) -> Mixture:
    """EM from a k-means start; each component's covariance OAS-shrunk with its own effective row count."""
    n, d = x.shape
    g = torch.Generator().manual_seed(seed)
    means = x[torch.randperm(n, generator=g)[:k]].clone()
    for _ in range(10):  # k-means (Lloyd) for the start
        a = torch.cdist(x, means).argmin(1)
        means = torch.stack([x[a == j].mean(0) if (a == j).any() else means[j] for j in range(k)])
    resp = torch.nn.functional.one_hot(a, k).double()
    mix = None
    for _ in range(iters if k > 1 else 1):
        counts = resp.sum(0).clamp_min(1e-9)
        means = (resp.T @ x) / counts[:, None]
        chols = []
        for j in range(k):
            xc = x - means[j]
            cov, _ = oas((xc * resp[:, j : j + 1]).T @ xc / counts[j], float(counts[j]))
            chols.append(torch.linalg.cholesky(cov))
        mix = Mixture(counts / counts.sum(), means, torch.stack(chols))
        resp = torch.softmax(mix.component_log_prob(x), 1)
    return mix


def _noise_by_class(cache: PairCache) -> dict[int, torch.Tensor]:
    rows: dict[int, list[torch.Tensor]] = {}
    for i in range(len(cache.shards)):
        noise, label = read_noise(cache, i, cache.num_classes + 1)
        noise = noise.flatten(1)
        for c in label.unique().tolist():
            rows.setdefault(int(c), []).append(noise[label == c])
    return {c: torch.cat(v) for c, v in sorted(rows.items())}


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--ks", default="1,2,4")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--nfes", default="1,2,4,8")
    ap.add_argument("--seeds", type=int, help="only the first SEEDS training seeds (default: all the runs')")
    args = ap.parse_args()
    ks, nfes = [int(k) for k in args.ks.split(",")], [int(k) for k in args.nfes.split(",")]
    cfg, on, _ = load_run(args.runs[0])
    results: dict = {"run": [str(r) for r in args.runs], "n": on.n, "ks": ks, "iters": args.iters, "nfes": nfes}
    results["seeds"] = []
    done = _measured(args.out, results)
    seeds = [(run, s) for run in args.runs for s in seed_range(_same_study(run, cfg))][: args.seeds]
    students = {r: students_of(r, cfg.student.train.steps) for r in args.runs}
    for run, s in seeds:
        export = students[run][("nfm", seeded(cfg, s).student.train.seed)]
        model, meta = load_student(export)
        cache = PairCache(find_cache(meta["flow"]["pairs"]))
        if (s, cache.key) in done:
            results["seeds"].append(done[s, cache.key])
            print(f"seed {s}: kept from {args.out}", flush=True)
            continue
        row: dict = {"seed": s, "cache": cache.key, "heldout_nats_per_dim": {}, "k": {}}
        fits: dict[int, dict[int, Mixture]] = {}
        for c, x in _noise_by_class(cache).items():
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(c))
            cut = len(x) // 10
            held, fit = x[perm[:cut]], x[perm[cut:]]
            fits[c] = {k: fit_mixture(fit, k, args.iters, seed=c) for k in ks}
            ll = {k: float(m.log_prob(held).mean()) / x.shape[1] for k, m in fits[c].items()}
            row["heldout_nats_per_dim"][c] = ll
            row["k"][c] = max(ll, key=ll.get)
            print(f"seed {s} class {c:3d} ({len(x)} rows) held-out nats/dim "
                  + " ".join(f"k{k} {v:.4f}" for k, v in ll.items()) + f" -> k {row['k'][c]}", flush=True)  # fmt: skip
        inputs = student_inputs(meta, on.n, seed=on.seed, labels_like=on.reference_labels)
        eps, y = inputs.eps.flatten(1), inputs.y
        scale = ProbPath.from_flow(meta["flow"]).prior_scale
        chosen = row["k"]
        for name, ks_used in (("gaussian (k = 1)", dict.fromkeys(chosen, 1)), ("mixture (k chosen per class)", chosen)):
            z = torch.empty_like(eps, dtype=torch.float64)
            g = torch.Generator().manual_seed(on.seed)
            for c in y.unique().tolist():
                z[y == c] = fits[c][ks_used[c]].transform(eps[y == c], g)
            z = (z * scale).float().view_as(inputs.eps)
            row[name] = euler_fids(model, meta, z, y, nfes, on)
            print(f"seed {s} NFM from {name:30s} " + " ".join(f"E{k} {f:7.3f}" for k, f in row[name].items()),
                  flush=True)  # fmt: skip
        results["seeds"].append(row)
        save(results, args.out)
    _table(results)


def _measured(out: Path | None, results: dict) -> dict:
    """The seed rows of an earlier run of this study at `out` with the same settings, by (seed, pair cache)."""
    if not out or not out.is_file():
        return {}
    old = json.loads(out.read_text())
    if any(old.get(k) != results[k] for k in ("n", "ks", "iters", "nfes")):
        return {}
    return {(row["seed"], row["cache"]): _int_keys(row) for row in old["seeds"]}


def _table(r: dict) -> None:
    euler_head("NFM student started from", r["nfes"])
    for name in ("gaussian (k = 1)", "mixture (k chosen per class)"):
        print(f"| {name} | " + " | ".join(cell([s[name][k] for s in r["seeds"]]) for k in r["nfes"]) + " |")
    print("\n| held-out log-likelihood, nats per dimension (mean over classes) | "
          + " | ".join(f"k = {k}" for k in r["ks"]) + " | k chosen (classes) |")  # fmt: skip
    print("|---|" + "---|" * (len(r["ks"]) + 1))
    for s in r["seeds"]:
        ll = s["heldout_nats_per_dim"]
        means = [sum(v[k] for v in ll.values()) / len(ll) for k in r["ks"]]
        chosen = {k: sum(1 for v in s["k"].values() if v == k) for k in r["ks"]}
        print(f"| seed {s['seed']} | " + " | ".join(f"{m:.4f}" for m in means) + " | "
              + ", ".join(f"k={k}: {n}" for k, n in chosen.items()) + " |")  # fmt: skip


if __name__ == "__main__":
    main()
