"""Our TarFlow's training step against Apple's ml-tarflow on the same architecture, side by side.

    python benchmarks/mltarflow_bench.py PATH/TO/ml-tarflow/transformer_flow.py [--quick] [--compile]

ml-tarflow (github.com/apple/ml-tarflow) is not part of this project: the benchmark imports its
`transformer_flow.py` from the path given and builds its `Model` with the same architecture as ours. ml-tarflow's
`Model` fixes the attention head width at 64, so both run at head_dim 64. Before timing, the benchmark copies
ml-tarflow's weights into our model (`nfm.teacher.mltarflow.map_state_dict`, the importer of published
checkpoints) and checks that both compute the same flow: z equal, log-determinants equal up to
ml-tarflow's per-dimension normalisation.

Rows (median step time of interleaved rounds, so machine load hits both alike):
  ml-tarflow      its train.py's step: noise, label drop, model, get_loss, backward, torch.optim.AdamW as it
                  constructs it (betas 0.9/0.95, weight decay 1e-4, torch's default implementation)
  ml-tarflow+fused  the same with our optimizer (fused AdamW), isolating the model's forward and backward
  nfm             our teacher step as the training loop takes it: teacher_loss (noise, label drop), backward,
                  gradient clipping to 1.0, fused AdamW (core.loop.adamw), EMA update
With --compile, both models again with torch.compile (ml-tarflow: its train.py's `compute_loss` compiled; ours:
`train.compile=true`, the module compiled), after a compile whose seconds are reported.

Writes benchmarks/results/mltarflow-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results  # noqa: E402
from nfm.core.checkpoint import EMA  # noqa: E402
from nfm.core.loop import TrainConfig, adamw  # noqa: E402
from nfm.core.seeding import BatchRandom  # noqa: E402
from nfm.teacher.mltarflow import map_state_dict  # noqa: E402
from nfm.teacher.model import TarFlow, TarFlowConfig  # noqa: E402
from nfm.teacher.train import teacher_loss  # noqa: E402

ETA, LABEL_DROP, CLASSES = 0.1, 0.1, 10
# name -> (channels, image size, patch, width, blocks, layers per block, batch): our digits / mnist sizes
CONFIGS = {
    "digits8-S": (1, 8, 2, 64, 4, 2, 64),  # the digits preset's teacher (its batch 64)
    "digits8": (1, 8, 2, 128, 4, 2, 128),
    "mnist28-S": (1, 28, 4, 64, 4, 2, 64),  # the fashion-mnist preset's teacher
}


def load_module(path: str):
    if not Path(path).is_file():
        raise SystemExit(f"{path}: no such file; clone github.com/apple/ml-tarflow and pass its transformer_flow.py")
    spec = importlib.util.spec_from_file_location("ml_tarflow_transformer_flow", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a Python file; pass ml-tarflow's transformer_flow.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "Model"):
        raise SystemExit(f"{path} defines no Model: pass ml-tarflow's transformer_flow.py")
    return mod


def build_pair(tf, name: str):
    c, s, p, w, blocks, layers, _ = CONFIGS[name]
    torch.manual_seed(0)
    theirs = tf.Model(in_channels=c, img_size=s, patch_size=p, channels=w, num_blocks=blocks,
                      layers_per_block=layers, num_classes=CLASSES)  # fmt: skip
    with torch.no_grad():  # non-trivial weights, as a trained model has (both start as the identity)
        for b in theirs.blocks:
            b.proj_out.weight.normal_(0, 0.01)
    cfg = TarFlowConfig(in_channels=c, img_size=s, patch_size=p, width=w, num_blocks=blocks, layers_per_block=layers,
                        head_dim=64, num_classes=CLASSES, noise_std=ETA)  # fmt: skip
    ours = TarFlow(cfg)
    ours.load_state_dict(map_state_dict(theirs.state_dict(), ours, "ml-tarflow"))
    return theirs, ours


def check_same_flow(theirs, ours, c: int, s: int) -> float:
    """Largest |z_ours - z_theirs| (float32: ml-tarflow's LayerNorms take float32 only); raises if the two are
    not the same flow."""
    x = torch.rand(4, c, s, s, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        z_t, _, ld_t = theirs.eval()(x, y)
        z_o, ld_o = ours.eval()(x, y)
    dz = (ours.patchify(z_o) - z_t).abs().max().item()
    dims = z_t.shape[1] * z_t.shape[2]
    if dz > 1e-4 or not torch.allclose(ld_o, ld_t * dims, rtol=1e-4, atol=1e-3):
        raise SystemExit(f"not the same flow: max |dz| {dz:.3g}, logdet {ld_o.tolist()} vs {(ld_t * dims).tolist()}")
    return dz


def their_step(tf_model, opt, x, y, compute_loss):
    x = x + ETA * torch.randn_like(x)
    mask = (torch.rand(y.size(0), device=y.device) < LABEL_DROP).int()
    y = (1 - mask) * y - mask
    opt.zero_grad()
    loss = compute_loss(x, y)
    loss.backward()
    opt.step()


def timed_rounds(steps: dict, rounds: int, per_round: int) -> dict[str, float]:
    """Median seconds per step of each callable, measured in interleaved rounds."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(rounds):
        for k, fn in steps.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            sync()
            times[k].append((time.perf_counter() - t0) / per_round)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def bench(tf, name: str, rounds: int, per_round: int, compile_: bool, device: torch.device) -> list[dict]:
    c, s, *_, batch = CONFIGS[name]
    theirs, ours = build_pair(tf, name)
    dz = check_same_flow(theirs, ours, c, s)  # on the CPU, before moving
    theirs, ours = theirs.to(device).train(), ours.to(device).train()
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, c, s, s, generator=gen) * 2 - 1).to(device)
    y = torch.randint(0, CLASSES, (batch,), generator=gen).to(device)

    def their_loss(model):
        def compute_loss(xx, yy):
            z, _, logdets = model(xx, yy)
            return model.get_loss(z, logdets)

        return compute_loss

    their_opt = torch.optim.AdamW(theirs.parameters(), betas=(0.9, 0.95), lr=1e-4, weight_decay=1e-4)
    theirs_fused = build_pair(tf, name)[0].to(device).train()
    fused_opt = adamw(theirs_fused, TrainConfig(lr=1e-4))
    cfg = TrainConfig(lr=1e-4, grad_clip=1.0)
    our_opt, ema = adamw(ours, cfg), EMA(ours, 0.999)
    loss_fn = teacher_loss(ETA, LABEL_DROP)
    counter = iter(range(10**9))

    def our_step(model=ours, opt=our_opt):
        i = next(counter)
        loss, _ = loss_fn(model, (x, y), BatchRandom(0, i, 0, batch, batch, x.device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, i)

    steps = {
        "ml-tarflow": lambda: their_step(theirs, their_opt, x, y, their_loss(theirs)),
        "ml-tarflow+fused": lambda: their_step(theirs_fused, fused_opt, x, y, their_loss(theirs_fused)),
        "nfm": our_step,
    }
    compile_s: dict[str, float] = {}
    if compile_:
        theirs_c = build_pair(tf, name)[0].to(device).train()
        opt_c = torch.optim.AdamW(theirs_c.parameters(), betas=(0.9, 0.95), lr=1e-4, weight_decay=1e-4)
        compiled_loss = torch.compile(their_loss(theirs_c), fullgraph=False, backend="inductor")
        ours_c = build_pair(tf, name)[1].to(device).train()
        ours_c.compile()
        opt_oc = adamw(ours_c, cfg)
        steps["ml-tarflow compiled"] = lambda: their_step(theirs_c, opt_c, x, y, compiled_loss)
        steps["nfm compiled"] = lambda: our_step(ours_c, opt_oc)
        for k in ("ml-tarflow compiled", "nfm compiled"):
            t0 = time.perf_counter()
            steps[k]()  # the compile
            compile_s[k] = round(time.perf_counter() - t0, 1)
    for fn in steps.values():  # warm-up
        fn()
    med = timed_rounds(steps, rounds, per_round)
    base = med["ml-tarflow"]
    return [
        {
            "config": name,
            "batch": batch,
            "tokens": (s // CONFIGS[name][2]) ** 2,
            "step": k,
            "ms": round(t * 1e3, 2),
            "img/s": round(batch / t),
            "vs ml-tarflow": f"{base / t:.2f}x",
            "compile s": compile_s.get(k, ""),
            "same flow: max dz": f"{dz:.1e}",
        }
        for k, t in med.items()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("transformer_flow", help="path of ml-tarflow's transformer_flow.py")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke test of the benchmark)")
    ap.add_argument("--compile", action="store_true", help="also both models under torch.compile")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    tf = load_module(args.transformer_flow)
    rounds, per_round = (3, 2) if args.quick else (7, 10)
    rows = []
    for name in args.configs.split(","):
        rows += bench(tf, name, rounds, per_round, args.compile, device)
    notes = (
        f"`python benchmarks/mltarflow_bench.py PATH/transformer_flow.py{' --compile' if args.compile else ''}` "
        f"(ml-tarflow at the path given; {rounds} interleaved rounds of {per_round} steps, median). Both models "
        "at head_dim 64 (ml-tarflow's Model fixes it), 10 classes, label drop 0.1, float32."
    )
    write_results(f"mltarflow-{device.type}", rows, notes)


if __name__ == "__main__":
    main()
