"""Small in-domain feature networks for FID/KID where Inception-v3 is too slow (CPU) or off-domain (8x8).

One classifier per built-in data set, trained once by this deterministic script on the train split:

    python -m nfm.pipeline.featurenet digits          # seconds on 2 CPU cores
    python -m nfm.pipeline.featurenet fashion-mnist   # minutes

writes pipeline/weights/featurenet-NAME.safetensors (+ .json with its held-out accuracy). Its
128-d penultimate features are what FID/KID compare (registered with torch-fidelity as
``nfm-NAME``; see pipeline.evaluate).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nfm.core.data import DataConfig, load_data
from nfm.core.errors import NFMError
from nfm.core.io import load_tensors, save_tensors, write_json

WEIGHTS_DIR = Path(__file__).parent / "weights"
FEATURE_DIM = 128
RECIPES = {  # data set -> (epochs, batch, lr)
    "digits": (60, 128, 2e-3),
    "fashion-mnist": (4, 256, 2e-3),
}


class FeatureNet(nn.Module):
    """conv + ReLU stages, max-pooled down to <= 7 px, flattened -> 128-d ReLU features -> classes.

    No normalisation layers and no global pooling: the features must stay sensitive to contrast,
    blur and where things are, or FID stops telling a blurry average from a sharp digit."""

    def __init__(self, channels: int, img_size: int, num_classes: int, width: int = 32):
        super().__init__()
        layers, c, s = [], channels, img_size
        while True:
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
            c = width
            if s <= 8:
                break
            layers.append(nn.MaxPool2d(2))
            s, width = s // 2, width * 2
        layers += [nn.MaxPool2d(2)]
        s //= 2
        self.body = nn.Sequential(*layers)
        self.features = nn.Linear(c * s * s, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, num_classes)
        self.meta = {"channels": channels, "img_size": img_size, "num_classes": num_classes}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x in [-1, 1], (b, C, H, W) -> (b, 128)."""
        return F.relu(self.features(self.body(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.dropout(self.embed(x), 0.2, self.training))


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"featurenet-{name}.safetensors"


def load_featurenet(name: str) -> FeatureNet:
    path = weights_path(name)
    if not path.is_file():
        raise NFMError(
            f"no feature network for {name!r} ({path} missing); train it with "
            f"`python -m nfm.pipeline.featurenet {name}`, or evaluate with feature_extractor=inception"
        )
    info = json.loads(path.with_suffix(".json").read_text())
    net = FeatureNet(info["channels"], info["img_size"], info["num_classes"])
    net.load_state_dict(load_tensors(path, "feature network weights"))
    return net.eval().requires_grad_(False)


def shift_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translations by up to 1 pixel (edge padding)."""
    dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
    return torch.roll(F.pad(x, (1, 1, 1, 1), mode="replicate"), shifts=(dy, dx), dims=(2, 3))[:, :, 1:-1, 1:-1]


def train_featurenet(name: str, out_dir: Path = WEIGHTS_DIR, log=print) -> dict:
    if name not in RECIPES:
        raise NFMError(f"no feature-network recipe for {name!r}; choose one of {', '.join(RECIPES)}")
    torch.manual_seed(0)
    epochs, batch, lr = RECIPES[name]
    train, test = load_data(DataConfig(name=name), "train"), load_data(DataConfig(name=name), "test")
    x, y = train.tensors()
    xt, yt = test.tensors()
    c, s, _ = train.image_shape
    net = FeatureNet(c, s, train.num_classes)
    steps = epochs * (len(x) // batch)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        net.train()
        for i in range(0, len(x) - batch + 1, batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(net(shift_augment(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        net.eval()
        with torch.no_grad():
            acc = float(
                torch.cat([net(xt[i : i + 1000]).argmax(1) for i in range(0, len(xt), 1000)]).eq(yt).float().mean()
            )
        log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, held-out accuracy {acc:.4f}")
    info = {
        **net.meta,
        "data": name,
        "test_accuracy": round(acc, 4),
        "epochs": epochs,
        "steps": step,
        "train_images": len(x),
        "test_images": len(xt),
        "seconds": round(time.perf_counter() - t0, 1),
        "feature_dim": FEATURE_DIM,
        "script": "python -m nfm.pipeline.featurenet " + name,
    }
    save_tensors(Path(out_dir) / f"featurenet-{name}.safetensors", net.state_dict())
    write_json(Path(out_dir) / f"featurenet-{name}.json", info)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=list(RECIPES))
    ap.add_argument("--out-dir", default=str(WEIGHTS_DIR))
    args = ap.parse_args()
    info = train_featurenet(args.name, Path(args.out_dir))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
