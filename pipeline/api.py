"""The Python surface: ``nfm.Teacher``, ``nfm.Student``, ``nfm.PairCache`` and ``nfm.run``.

In the style of diffusers / transformers: ``from_pretrained`` takes a local directory (a run directory or
its ``export/``) or a Hugging Face Hub repo id, ``save_pretrained`` writes the same export format the
``nfm`` command reads, and ``sample`` applies the model's own prior, classes and path::

    import nfm

    student = nfm.Student.from_pretrained("runs/run-digits/students/nfm-5f0c...")
    images = student.sample(16, steps=2, output="pil")          # 16 PIL images, two Euler steps
    teacher = nfm.Teacher.from_pretrained("runs/run-digits/teacher-1ed8ce6dbf")
    pairs = nfm.PairCache.open("5a780a2f4e50")                  # a key (prefix) under the cache root, or a dir
    ds = pairs.to_dataset()                                     # a datasets.Dataset over the shards, no copy
    report = nfm.run("tiny", run_dir="runs/tiny")               # the whole pipeline; returns report.json's dict
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from nfm.core.errors import NFMError
from nfm.core.hub import hub_snapshot, hub_upload, is_repo_id, local_or_hub
from nfm.core.images import to_uint8
from nfm.pairs.lookup import find_cache
from nfm.pairs.reader import FLOW_KINDS
from nfm.pairs.reader import PairCache as _PairCache

Output = Literal["tensor", "pil", "uint8"]


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _push(save: Any, repo_id: str, private: bool, commit_message: str) -> str:
    """save_pretrained into a temporary directory, then upload it as one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    with hub_upload(repo_id), tempfile.TemporaryDirectory() as tmp:
        api.create_repo(repo_id, private=private, exist_ok=True)
        save(Path(tmp))
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
    return str(getattr(info, "commit_url", info))


def _labels(
    labels, n: int, num_classes: int, device: torch.device, names: list[str] | None = None
) -> torch.Tensor | None:
    """None: classes cycled 0..K-1 (unconditional models: none); an int or a class name: every sample; a
    sequence of either: as given. `names`: the class names the model's data has (an image folder's subfolders)."""
    if not num_classes:
        if labels is not None:
            raise NFMError("this model has no classes: leave labels=None")
        return None
    if isinstance(labels, str) or (isinstance(labels, list | tuple) and any(isinstance(v, str) for v in labels)):
        labels = _class_ids(labels, names)
    if labels is None:
        y = torch.arange(n) % num_classes
    elif isinstance(labels, int):
        y = torch.full((n,), labels, dtype=torch.long)
    else:
        y = torch.as_tensor(labels, dtype=torch.long).flatten()
        if len(y) != n:
            raise NFMError(f"labels has {len(y)} entries for {n} samples")
    if ((y < -1) | (y >= num_classes)).any():
        raise NFMError(f"labels must be classes 0..{num_classes - 1} (or -1: unconditional), got {y.unique().tolist()}")
    return y.to(device)


def _class_ids(labels: str | list | tuple, names: list[str] | None) -> int | list[int]:
    """Class names -> class ids, by the names the model's data has."""
    if not names:
        raise NFMError(f"labels={labels!r}: this model records no class names (its data has none): give class ids")
    index = {name: i for i, name in enumerate(names)}
    wanted = [labels] if isinstance(labels, str) else list(labels)
    unknown = [v for v in wanted if isinstance(v, str) and v not in index]
    if unknown:
        raise NFMError(f"unknown class {unknown[0]!r}; this model's classes: {', '.join(names)}")
    ids = [index[v] if isinstance(v, str) else v for v in wanted]
    return ids[0] if isinstance(labels, str) else ids


def _output(x: torch.Tensor, output: Output):
    """Samples in [-1, 1] as a float tensor, uint8 tensor (N, C, H, W) or a list of PIL images."""
    x = x.clamp(-1, 1)
    if output == "tensor":
        return x
    u8 = to_uint8(x.cpu())
    if output == "uint8":
        return u8
    if output == "pil":
        from PIL import Image

        arr = u8.permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]
    raise NFMError(f"output must be 'tensor', 'uint8' or 'pil', got {output!r}")


class Student:
    """A trained flow-matching student: its velocity network and the settings it was trained with (the
    export's config.json: model, flow path, data) and the prior it samples from (`prior`: a Gaussian per class
    fitted to its pair cache's noise, or None for N(0, I)). Call it as v(x, t, y)."""

    def __init__(self, model: torch.nn.Module, config: dict[str, Any], prior: Any = None):
        self.model = model
        self.config = config
        self.prior = prior  # core.prior.Prior | None

    @property
    def class_names(self) -> list[str] | None:
        """The name of each class of the data it was trained on, where the data has them (labels="circle")."""
        return self.config.get("class_names")

    @classmethod
    def from_pretrained(
        cls, path_or_repo: str | Path, device: str | torch.device | None = None, revision: str | None = None
    ) -> Student:
        """A student run directory, its ``export/``, or a Hub repo holding an export."""
        from nfm.student.train import load_student, student_prior

        path = local_or_hub(path_or_repo, revision)
        model, meta = load_student(path, _device(device))
        return cls(model, meta, student_prior(path, meta))

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write model.safetensors + config.json (the format `nfm student sample` and `from_pretrained` read)."""
        from nfm.core.io import save_tensors, sha256_file, write_json
        from nfm.student.train import PRIOR_NAME

        d = Path(directory)
        sd = {k: v.float() for k, v in self.model.state_dict().items()}
        save_tensors(d / "model.safetensors", sd, metadata={"format": "nfm-student"})
        config = {k: v for k, v in self.config.items() if k != "prior"}
        if self.prior is not None:
            self.prior.save(d / PRIOR_NAME)
            config["prior"] = {**self.config.get("prior", {}), "sha256": sha256_file(d / PRIOR_NAME)}
        write_json(d / "config.json", config)
        return d

    def push_to_hub(self, repo_id: str, private: bool = False, commit_message: str = "nfm student") -> str:
        return _push(self.save_pretrained, repo_id, private, commit_message)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_classes(self) -> int:
        return int(self.config["model"]["num_classes"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        m = self.config["model"]
        return (m["in_channels"], m["img_size"], m["img_size"])

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x, t, y)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        labels: int | list[int] | torch.Tensor | None = None,
        solver: str = "auto",  # as `nfm student sample`: mean for a one-step student, euler otherwise
        steps: int = 4,
        guidance: float = 0.0,
        seed: int | None = None,
        output: Output = "tensor",
        prior: str = "auto",
    ):
        """n samples from the student's own prior (its fitted prior if it has one, else its path's N(0, I);
        prior="gaussian" forces N(0, I); a data-source student starts from held-out source images), integrated
        with `solver` (euler, midpoint, heun, rk4, mean: `steps` steps; dopri5: adaptive; auto: mean for a one-step
        student, meanflow or shortcut, euler otherwise). labels: None cycles the
        classes, an int or a list picks them. seed: the noise (None: a fresh one)."""
        from nfm.student.sampling import pick_solver, sample_ode, student_inputs

        if prior not in ("auto", "gaussian", "fitted"):
            raise NFMError(f"prior={prior!r}: choose auto, gaussian or fitted")
        if prior == "fitted" and self.prior is None:
            raise NFMError("this student has no fitted prior (it was not trained on a teacher's pairs): prior=gaussian")
        seed = int(torch.randint(2**31 - 1, ()).item()) if seed is None else seed
        y = _labels(labels, n, self.num_classes, self.device, self.class_names)
        fitted = None if prior == "gaussian" else self.prior
        inputs = student_inputs(self.config, n, seed=seed, device=self.device, labels=y, prior=fitted)
        solver = pick_solver(solver, self.model)
        x, _ = sample_ode(
            self.model, inputs.z, y, solver=solver, steps=steps, guidance=guidance, num_classes=self.num_classes
        )
        return _output(x, output)


class Teacher:
    """A normalizing-flow teacher: this project's TarFlow, an ml-tarflow checkpoint or a user's flow (the
    teacher protocol: encode, decode, image_shape, num_classes). `flow` is the underlying module."""

    def __init__(self, flow: Any, class_names: list[str] | None = None):
        self.flow = flow
        self.class_names = class_names  # of its data, where its export records them (labels="circle")

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | Path,
        device: str | torch.device | None = None,
        arch: str | dict | None = None,
        revision: str | None = None,
    ) -> Teacher:
        """A teacher run directory or export, ``ml-tarflow:FILE.pth``, ``python:module:factory``, or a Hub
        repo holding an export (arch: the architecture of an ml-tarflow checkpoint or a factory's kwargs)."""
        from nfm.teacher.protocol import load_teacher_spec

        spec = str(path_or_repo)
        if not spec.startswith(("ml-tarflow:", "python:")):
            spec = str(local_or_hub(path_or_repo, revision))
        flow, info = load_teacher_spec(spec, _device(device), arch)
        if info["kind"] != "tarflow":
            return cls(flow)
        from nfm.teacher.export import export_info

        return cls(flow, export_info(spec).get("class_names"))

    def save_pretrained(self, directory: str | Path) -> Path:
        """A TarFlow teacher's export (model.safetensors + config.json); other flows save themselves."""
        from nfm.teacher.export import save_export
        from nfm.teacher.model import TarFlow

        if not isinstance(self.flow, TarFlow):
            raise NFMError(f"save_pretrained writes TarFlow teachers; this one is a {type(self.flow).__name__}")
        save_export(self.flow, Path(directory), step=0)
        return Path(directory)

    def push_to_hub(self, repo_id: str, private: bool = False, commit_message: str = "nfm teacher") -> str:
        return _push(self.save_pretrained, repo_id, private, commit_message)

    @property
    def num_classes(self) -> int:
        return int(self.flow.num_classes or 0)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.flow.image_shape)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> the flow's noise (the NFM coupling's source side)."""
        return self.flow.encode(x, y)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.flow.decode(z, y)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        labels: int | list[int] | torch.Tensor | None = None,
        seed: int | None = None,
        denoise: bool = True,
        output: Output = "tensor",
    ):
        """n samples: decode prior noise (the flow's own prior scale), then its denoising step if it has
        one and `denoise`."""
        from nfm.teacher.protocol import prior_std, teacher_device

        dev = teacher_device(self.flow)
        seed = int(torch.randint(2**31 - 1, ()).item()) if seed is None else seed
        eps = torch.randn(n, *self.image_shape, generator=torch.Generator().manual_seed(seed))
        y = _labels(labels, n, self.num_classes, dev, self.class_names)
        x = self.flow.decode((eps * prior_std(self.flow).cpu()).to(dev), y)
        if denoise and callable(getattr(self.flow, "denoise", None)) and getattr(self.flow, "noise_std", 0) > 0:
            x = self.flow.denoise(x, y)
        return _output(x, output)


class PairCache(_PairCache):
    """A complete, validated pair cache (noise, data, label, index per row): ``PairCache.open(key_or_dir)``."""

    @classmethod
    def open(
        cls, key_or_dir: str | Path, root: str | Path | None = None, kinds: tuple[str, ...] = FLOW_KINDS
    ) -> PairCache:
        """A cache directory, or a key (or a prefix of at least 4 characters) under the cache root
        ($NFM_CACHE_DIR, else ~/.cache/nfm/pairs). `kinds`: the cache kinds accepted (default: the noise/data
        pairs of a teacher or a reflow student; ("kt",) for a logit cache)."""
        return cls(find_cache(str(key_or_dir), Path(root) if root else None), kinds=kinds, reader="PairCache.open")

    @classmethod
    def from_pretrained(
        cls, key_dir_or_repo: str | Path, root: str | Path | None = None, revision: str | None = None
    ) -> PairCache:
        """A local cache (directory, key or key prefix) as `open` finds it; otherwise a Hub *dataset* repo that
        `push_to_hub` wrote: downloaded, checked byte for byte against its index (sha256 and xxh3 of every
        shard), and installed under the cache root as its key, where `nfm student train --pairs KEY` finds it."""
        from nfm.pairs.lookup import default_cache_root
        from nfm.pairs.share import install_cache

        text = str(key_dir_or_repo)
        try:
            return cls.open(text, root)
        except NFMError:
            if not is_repo_id(text) or Path(text).expanduser().exists():
                raise
        snapshot = hub_snapshot(text, revision, repo_type="dataset")
        origin = f"hub:{text}" + (f"@{revision}" if revision else "")
        return cls(install_cache(snapshot, Path(root) if root else default_cache_root(), origin))

    def push_to_hub(self, repo_id: str, private: bool = False, commit_message: str | None = None) -> str:
        """Upload the cache (index, shards, a dataset card) to the Hub dataset repo `repo_id` in one commit,
        after checking every shard against the index. Returns the commit URL."""
        from nfm.pairs.share import push_cache

        return push_cache(self.dir, repo_id, private, commit_message)

    def rows(self, chunk: int = 4096) -> Iterator[dict[str, torch.Tensor]]:
        """Every row in storage order, shard by shard (checksums verified): the noise as the student reads it
        (unit variance; a logit cache: `logits`), images as floats in [-1, 1]."""
        first = self.columns[0]
        for i, entry in enumerate(self.shards):
            shard = self.shard(i)
            cols = {k: shard.empty(k) for k in (first, "data", "label", "index")}
            shard.read_verified(entry, cols)
            for a in range(0, shard.rows, chunk):
                yield {
                    first: cols[first][a : a + chunk].float(),
                    "image": self.to_float(cols["data"][a : a + chunk]),
                    "label": cols["label"][a : a + chunk],
                    "index": cols["index"][a : a + chunk],
                }

    def torch_dataset(self, verify: bool = True) -> torch.utils.data.Dataset:
        """A map-style torch Dataset of (noise, image, label) rows (a logit cache: (logits, image, label)), read
        from disk row by row. ``verify`` hashes
        every shard against the index first (xxh3, about 20 GB/s), as every other reader of the cache does."""
        return _TorchPairs(self, verify)

    def to_dataset(self, verify: bool = True):
        """The cache as a `datasets.Dataset`, without a copy: every shard is memory-mapped and its tensors are
        wrapped as Arrow arrays in place (pages load when a row is touched; nothing is written elsewhere).

        Columns, formatted as torch tensors: ``noise`` (the stored dtype, unit variance as the student reads
        it; a logit cache: ``logits``, one per class), ``data`` (the images as stored: grey-level codes,
        ``pairs.to_float(batch["data"])`` maps them to [-1, 1]), ``label`` and ``index`` (the training image each
        row was built from). ``verify`` hashes
        every shard against the index first (xxh3, about 20 GB/s), as every other reader of the cache does."""
        import datasets
        import pyarrow as pa

        tables, first = [], self.columns[0]
        for i, entry in enumerate(self.shards):
            shard = self.shard(i)
            if verify:
                shard.verify(entry)
            cols = shard.mapped()
            tables.append(
                pa.table(
                    {
                        first: _arrow_array(cols[first]),
                        "data": _arrow_array(cols["data"]),
                        "label": pa.array(cols["label"]),
                        "index": pa.array(cols["index"]),
                    }
                )
            )
        table = pa.concat_tables(tables)  # the shards stay separate chunks: still no copy
        info = datasets.DatasetInfo(
            description=f"nfm pair cache {self.key} ({self.dir}): {self.kind} ({', '.join(self.columns)})",
            features=datasets.Features.from_arrow_schema(table.schema),
        )
        ds = datasets.Dataset(datasets.table.InMemoryTable(table), info=info, fingerprint=f"nfm-pairs-{self.key}")
        return ds.with_format("torch")


def _arrow_array(x):
    """(n, c, h, w) numpy array -> datasets' Array3D extension array over the same memory (the values are not
    copied; only the list offsets, 4 bytes per image row, are new); (n, k) (a logit cache's logits) -> a
    fixed-size list array, no copy either."""
    import numpy as np
    import pyarrow as pa
    from datasets.features.features import Array3DExtensionType

    if x.size >= 2**31:
        raise NFMError(f"a pair shard holds {x.size} values in one tensor, more than Arrow's 32-bit lists address")
    arr = pa.array(x.reshape(-1))
    if x.ndim == 2:
        return pa.FixedSizeListArray.from_arrays(arr, x.shape[1])
    n, c, h, w = x.shape
    for size, count in ((w, n * c * h), (h, n * c), (c, n)):
        arr = pa.ListArray.from_arrays(pa.array(np.arange(0, (count + 1) * size, size, dtype=np.int32)), arr)
    return pa.ExtensionArray.from_storage(Array3DExtensionType((c, h, w), str(x.dtype)), arr)


class _TorchPairs(torch.utils.data.Dataset):
    def __init__(self, cache: PairCache, verify: bool = True):
        self.cache = cache
        self.files = [cache.shard(i) for i in range(len(cache.shards))]  # headers parsed once, not per row
        if verify:  # no row reaches the caller from a shard that does not match its checksum
            for f, entry in zip(self.files, cache.shards):
                f.verify(entry)
        self.starts = []
        a = 0
        for s in cache.shards:
            self.starts.append(a)
            a += s["rows"]

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        import bisect

        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        s = bisect.bisect_right(self.starts, i) - 1
        shard, r = self.files[s], i - self.starts[s]
        noise = shard.read(self.cache.columns[0], r, r + 1)[0].float()
        image = self.cache.to_float(shard.read("data", r, r + 1))[0]
        return noise, image, int(shard.read("label", r, r + 1)[0])


def run(
    preset: str = "digits",
    run_dir: str | Path | None = None,
    *,
    seeds: int | None = None,
    cache_dir: str | Path | None = None,
    from_teacher: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """`nfm run --preset PRESET` from Python: every stage (reused where finished), the evaluation and the
    report; returns report.json's content. Overrides as keyword arguments with "__" for dots:
    ``nfm.run("digits", couplings="nfm,sd-ot", student__train__steps=3000)``. cache_dir: the pair caches'
    root (as `nfm run --cache-dir`; default $NFM_CACHE_DIR/pairs, else ~/.cache/nfm/pairs)."""
    from nfm.core.config import build_config
    from nfm.core.io import read_json
    from nfm.pipeline.presets import run_preset
    from nfm.pipeline.run import RunConfig, run_pipeline

    items = [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    if seeds is not None:
        items.append(f"seeds={seeds}")
    cfg = build_config(RunConfig, preset=run_preset(preset), overrides=items)
    run_dir = Path(run_dir or f"runs/run-{preset}")
    report = run_pipeline(cfg, run_dir, preset, from_teacher, Path(cache_dir) if cache_dir else None)
    return read_json(run_dir / "report.json", "run report") if report is not None else {}
