"""Fault injection: every way a cache, a checkpoint or a setting was found to break trust (issue 11), tried
again. Each test damages something on purpose and asserts the promised behaviour: one clear line, nothing
trained on bad bytes, nothing half-restored."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import replace

import pytest
import torch
from filelock import FileLock

from nfm.core.checkpoint import list_checkpoints
from nfm.core.config import build_config
from nfm.core.data import DataConfig, load_data
from nfm.core.errors import NFMError
from nfm.core.io import load_tensors, sha256_file
from nfm.pairs.build import PairBuildConfig, build_pairs
from nfm.pairs.format import INDEX_NAME, check_index, read_index
from nfm.pairs.reader import PairCache, PairReader
from nfm.pairs.verify import check_shards
from nfm.pipeline.presets import TEACHER_PRESETS
from nfm.teacher.export import load_teacher
from nfm.teacher.train import TeacherRunConfig, run_teacher_training
from tests.conftest import caches, make_teacher_export, run_nfm, run_nfm_inline

DATA = DataConfig(name="digits", held_out=0.9)  # 180 training images


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_teacher_export(tmp_path_factory.mktemp("teacher") / "export", data=DATA)


def _build(export, root, **cfg):
    return build_pairs(load_teacher(export), load_data(DATA), PairBuildConfig(shard_rows=60, **cfg), root, log=print)


@pytest.fixture
def cache(export, tmp_path):
    return _build(export, tmp_path / "pairs").path


def _flip(path, offset=-5):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _first_window(cache_dir):
    reader = PairReader(PairCache(cache_dir), window=8)
    return next(reader.batches(16))


def _tamper(cache_dir, change):
    index = read_index(cache_dir)
    change(index)
    (cache_dir / INDEX_NAME).write_text(json.dumps(index))


# ----------------------------------------------------------------------------- content


def test_a_flipped_byte_never_reaches_a_batch(export, cache, tmp_path, capsys):
    _flip(cache / "pairs-00002-of-00003.safetensors")
    with pytest.raises(NFMError, match="pairs-00002-of-00003.safetensors does not match its checksum"):
        _first_window(cache)
    assert check_shards(cache) == ["pairs-00002-of-00003.safetensors: sha256 mismatch (corrupt)"]
    assert _build(export, tmp_path / "pairs").hit  # a hit checks the structure, which is intact ...
    with pytest.raises(NFMError, match="sha256 mismatch"):  # ... and with verify=True the content
        build_pairs(load_teacher(export), load_data(DATA), PairBuildConfig(shard_rows=60), tmp_path / "pairs",
                    log=print, verify=True)  # fmt: skip


def test_student_training_stops_on_a_corrupt_shard_without_an_export(cache, tmp_path):
    _flip(cache / "pairs-00001-of-00003.safetensors", offset=-200)
    args = ["student", "train", "--preset", "tiny", "--pairs", cache, "--run-dir", tmp_path / "s"]
    p = run_nfm(*args, check=False)
    assert p.returncode == 2 and "pairs-00001-of-00003.safetensors does not match its checksum" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "s" / "export").exists()


def test_a_wrong_checksum_in_the_index_is_refused(cache):
    _tamper(cache, lambda ix: ix["shards"][0].update(xxh3_128="0" * 32))
    with pytest.raises(NFMError, match="pairs-00001-of-00003.safetensors does not match its checksum"):
        _first_window(cache)
    assert check_shards(cache) == ["pairs-00001-of-00003.safetensors: xxh3-128 mismatch (corrupt)"]


# ----------------------------------------------------------------------------- the index against the files


def _drop_one(ix):
    gone = ix["shards"].pop(1)
    ix["total_rows"] -= gone["rows"]


@pytest.mark.parametrize(
    "change,problem",
    [
        (_drop_one, "the index lists 2 shards for num_shards=3"),
        (
            lambda ix: ix["shards"][0].update(rows=59),
            "pairs-00001-of-00003.safetensors: holds 60 pairs, the index says 59",
        ),
        (lambda ix: ix["shards"][0].update(rows=61), "holds 60 pairs, the index says 61"),
        (lambda ix: ix.update(total_rows=179), "total_rows is 179, the shards' rows add up to 180"),
        (
            lambda ix: ix["shapes"].update(noise=[1, 4, 4]),
            "noise is float16 (1, 8, 8), the index says float16 (1, 4, 4)",
        ),
        (lambda ix: ix.update(expected_rows=200), "180 pairs + 0 dropped != the 200 expected"),
    ],
)
def test_verify_and_the_reader_check_everything_the_index_claims(cache, tmp_path, change, problem):
    _tamper(cache, change)
    assert any(problem in p for p in check_index(cache, read_index(cache))), check_index(cache, read_index(cache))
    assert any(problem in p for p in check_shards(cache))
    with pytest.raises(NFMError, match="does not match its index"):
        PairCache(cache)
    p = run_nfm_inline("pairs", "verify", cache, "--samples", "0")
    assert p.returncode == 2 and problem in p.stderr and "Traceback" not in p.stderr


def test_a_symlinked_shard_is_refused(export, cache, tmp_path):
    victim = cache / "pairs-00003-of-00003.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(victim.read_bytes())
    victim.unlink()
    victim.symlink_to(outside)
    with pytest.raises(NFMError, match="is a symbolic link"):
        PairCache(cache)
    assert any("symbolic link" in p for p in check_shards(cache))
    with pytest.raises(NFMError, match="does not match its index: .*symbolic link"):
        _build(export, tmp_path / "pairs")  # a hit refuses it too
    p = run_nfm_inline("pairs", "verify", cache, "--samples", "0")
    assert p.returncode == 2 and "symbolic link" in p.stderr


# ----------------------------------------------------------------------------- concurrency and leftovers


def test_two_builds_of_one_key_at_once(export, tmp_path):
    args = ["pairs", "build", "--teacher", export, "--views", "3", "--cache-dir", tmp_path, "pairs.shard_rows=40"]
    procs = [run_nfm(*args, background=True, capture=True) for _ in range(2)]
    outs = [p.communicate(timeout=1800) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    said = " ".join(o[0] for o in outs)
    assert said.count("pair cache built") + said.count("pair cache hit") == 2
    (cache_dir,) = caches(tmp_path)
    assert read_index(cache_dir)["complete"] and check_shards(cache_dir) == []


def test_leftovers_of_a_killed_build_are_removed_on_the_next_start(export, tmp_path):
    cache_dir = _build(export, tmp_path).path
    (cache_dir / "pairs-00003-of-00003.safetensors").unlink()
    _tamper(cache_dir, lambda ix: ix.update(complete=False, shards=ix["shards"][:2], total_rows=120))
    for name in (".pairs-00003-of-00003.safetensors.x1y2.tmp", ".tmpab12cd", ".pairs.index.json.q9.tmp"):
        (cache_dir / name).write_bytes(b"half")
    assert _build(export, tmp_path).built_rows == 60
    assert sorted(p.name for p in cache_dir.iterdir()) == [
        "pairs-00001-of-00003.safetensors", "pairs-00002-of-00003.safetensors", "pairs-00003-of-00003.safetensors",
        INDEX_NAME,
    ]  # fmt: skip


def test_a_second_training_in_one_run_directory_is_refused(tmp_path):
    cfg = build_config(TeacherRunConfig, preset=TEACHER_PRESETS["tiny"], overrides=["train.steps=2"])
    tmp_path.mkdir(exist_ok=True)
    with FileLock(str(tmp_path / ".lock")):  # another process is training here
        with pytest.raises(NFMError, match="in use by another nfm process"):
            run_teacher_training(cfg, tmp_path)
    run_teacher_training(cfg, tmp_path)  # once it is gone, the directory is free


# ----------------------------------------------------------------------------- checkpoints


def _tiny(**train):
    cfg = build_config(TeacherRunConfig, preset=TEACHER_PRESETS["tiny"])
    return replace(cfg, train=replace(cfg.train, sample_every=0, **train))


def _interrupted_run(run_dir, steps=12, every=4):
    """A run with checkpoints at 4, 8 and 12 whose export is removed: the next call resumes from a checkpoint."""
    cfg = _tiny(steps=steps, ckpt_every=every, keep_ckpts=3)
    run_teacher_training(cfg, run_dir)
    import shutil

    shutil.rmtree(run_dir / "export")
    return cfg


def test_a_killed_checkpoint_write_leaves_nothing_behind(tmp_path):
    cfg = _interrupted_run(tmp_path)
    partial = tmp_path / "checkpoints" / ".step-0000016.abcd.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    run_teacher_training(cfg, tmp_path)
    assert not partial.exists()


def test_a_checkpoint_of_another_model_is_skipped(tmp_path):
    cfg = _interrupted_run(tmp_path)
    other = tmp_path / "other"
    run_teacher_training(replace(cfg, model=replace(cfg.model, width=16, head_dim=8)), other)
    newest = list_checkpoints(tmp_path)[-1]
    for f in ("model.safetensors", "ema.safetensors", "optimizer.pt"):  # its files, under this run's identity
        (newest / f).write_bytes((list_checkpoints(other)[-1] / f).read_bytes())
    state = json.loads((newest / "state.json").read_text())
    state["sha256"] = {f: sha256_file(newest / f) for f in state["sha256"]}
    (newest / "state.json").write_text(json.dumps(state))
    run_teacher_training(cfg, tmp_path)
    log = (tmp_path / "log.txt").read_text()
    assert f"skipping checkpoint {newest}" in log and "belongs to another model" in log
    assert "resumed from" in log and "(step 8)" in log


def test_every_ema_truncated_starts_exactly_as_a_clean_run(tmp_path):
    cfg = _interrupted_run(tmp_path / "damaged")
    for ckpt in list_checkpoints(tmp_path / "damaged"):
        ema = ckpt / "ema.safetensors"
        ema.write_bytes(ema.read_bytes()[:-64])
    damaged = run_teacher_training(cfg, tmp_path / "damaged")
    clean = run_teacher_training(cfg, tmp_path / "clean")
    a, b = load_tensors(damaged / "model.safetensors"), load_tensors(clean / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # not a mix of the last checkpoint and a fresh start
    assert (tmp_path / "damaged" / "log.txt").read_text().count("skipping checkpoint") == 3


# ----------------------------------------------------------------------------- settings and one-line errors


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.batch_size=0", "'train.batch_size' must be >= 1, got 0"),
        ("train.batch_size=-4", "'train.batch_size' must be >= 1, got -4"),
        ("train.lr=-1", "'train.lr' must be > 0, got -1.0"),
        ("train.lr=nan", "'train.lr' must be > 0, got nan"),
        ("train.steps=0", "'train.steps' must be >= 1, got 0"),
        ("train.steps=-5", "'train.steps' must be >= 1, got -5"),
        ("train.ckpt_every=-1", "'train.ckpt_every' must be >= 0, got -1"),
    ],
)
def test_bad_training_settings_are_one_line(tmp_path, override, message):
    p = run_nfm_inline("teacher", "train", "--preset", "tiny", "--run-dir", tmp_path / "r", override)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "r" / "export").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--batch-size", "0"], "'pairs.batch_size' must be >= 1, got 0"),
        (["pairs.shard_rows=-3"], "'pairs.shard_rows' must be >= 0, got -3"),
        (["--views", "0"], "'pairs.views' must be >= 1, got 0"),
    ],
)
def test_bad_pair_settings_are_one_line(export, tmp_path, args, message):
    p = run_nfm_inline("pairs", "build", "--teacher", export, "--cache-dir", tmp_path, *args)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("key", ["", "*", "ab"])
def test_pairs_rm_needs_an_unambiguous_key(cache, key):
    p = run_nfm_inline("pairs", "rm", key, "--cache-dir", cache.parent)
    assert p.returncode == 2 and "at least 4" in p.stderr and cache.is_dir()
    with FileLock(str(cache.parent / f".{cache.name}.lock")):  # a build of this key is running
        p = run_nfm_inline("pairs", "rm", cache.name, "--cache-dir", cache.parent)
    assert p.returncode == 2 and "being built by another process" in p.stderr and cache.is_dir()
    p = run_nfm_inline("pairs", "rm", cache.name[:6], "--cache-dir", cache.parent)
    assert p.returncode == 0 and f"removed {cache}" in p.stdout and not cache.exists()
    assert not list(cache.parent.iterdir())  # its lock file went with it


def test_a_full_disk_is_one_line_and_the_cache_resumes(export, tmp_path, monkeypatch, capsys):
    """ENOSPC during a shard write (simulated by patching the writer): one line, the partial cache resumes."""
    import nfm.pairs.writer as pb
    from nfm.pipeline.cli import main

    real, calls = pb.save_tensors, {"n": 0}

    def full_after_one(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(pb, "save_tensors", full_after_one)
    args = ["pairs", "build", "--teacher", str(export), "--views", "1", "--cache-dir", str(tmp_path)]
    args.append("pairs.shard_rows=60")
    assert main(args) == 1
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "nfm: error" in x]  # (the rest is the progress bar)
    assert "No space left on device (OSError); the disk is full" in line and "Traceback" not in err
    monkeypatch.setattr(pb, "save_tensors", real)
    assert main(args) == 0
    (cache_dir,) = caches(tmp_path)
    assert check_shards(cache_dir) == []


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(export, tmp_path, monkeypatch, capsys):
    import nfm.pairs.build as pb
    from nfm.pipeline.cli import main

    def broken(*a, **k):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(pb, "estimate_sigma", broken)
    args = ["pairs", "build", "--teacher", str(export), "--views", "1", "--cache-dir", str(tmp_path)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("nfm: error: boom (ZeroDivisionError); this is probably a bug") and err.count("\n") == 1
    with pytest.raises(ZeroDivisionError):
        main(["--debug", *args])
    monkeypatch.setenv("NFM_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(args)


def test_an_unreadable_image_is_named(tmp_path):
    """A text file named .png (or a truncated PNG) in an image folder: one line naming the file."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    good = (folder / "img3.png").read_bytes()
    (folder / "img3.png").write_bytes(good[: len(good) // 2])  # truncated
    data = load_data(DataConfig(name=str(folder), held_out=0.2), "train")
    with pytest.raises(NFMError, match=r"image .*img3\.png of .* cannot be read \(.*\); remove or replace the file"):
        data.tensors()
    cfg = build_config(TeacherRunConfig, preset=TEACHER_PRESETS["tiny"], overrides=[f"data.name={folder}"])
    p = run_nfm("teacher", "train", "--preset", "tiny", "--run-dir", tmp_path / "r", f"data.name={folder}",
                "data.held_out=0.2", "model.num_classes=0", check=False)  # fmt: skip
    assert p.returncode == 2 and "img3.png" in p.stderr and "Traceback" not in p.stderr
    assert "data.skip_bad=true" in p.stderr and cfg.data.name == str(folder)
    # data.skip_bad=true: every image decoded once, the unreadable ones named and left out
    skip = DataConfig(name=str(folder), held_out=0.2, skip_bad=True)
    splits = [load_data(skip, split) for split in ("train", "test")]
    assert sum(len(d) for d in splits) == 5 and sum(len(d.skipped) for d in splits) == 1
    assert any("1 unreadable images skipped: img3.png" in d.describe() for d in splits)
    assert all(torch.isfinite(d.tensors()[0]).all() for d in splits)


def test_a_new_config_field_at_its_default_changes_no_hash_or_run_config():
    """data.skip_bad came after runs were hashed: at its default it is not in to_dict (run-directory hashes
    and config.json of older runs stay valid); set, it is."""
    from nfm.core.config import to_dict

    assert "skip_bad" not in to_dict(DataConfig()) and to_dict(DataConfig(skip_bad=True))["skip_bad"] is True
    cfg = build_config(TeacherRunConfig, preset=TEACHER_PRESETS["digits"])
    assert "skip_bad" not in to_dict(cfg)["data"]
    assert "skip_bad" in build_config(TeacherRunConfig, overrides=["data.skip_bad=true"]).data.__dict__


def test_the_first_signal_stops_a_step_that_never_ends(tmp_path, monkeypatch):
    """SIGTERM during a first step that would take very long (a huge batch): nothing to save, so it stops at
    once instead of waiting for the step; no checkpoint is written."""
    import signal

    import nfm.teacher.train as tt
    from nfm.core.loop import Interrupted

    reached = {"end of step": False}
    original = tt.teacher_loss

    def slow_loss(eta, label_drop):
        fn = original(eta, label_drop)

        def loss_fn(model, batch, rng):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(200_000_000):  # a step that would take minutes
                pass
            reached["end of step"] = True
            return fn(model, batch, rng)

        return loss_fn

    monkeypatch.setattr(tt, "teacher_loss", slow_loss)
    with pytest.raises(Interrupted, match="interrupted at step 0"):
        run_teacher_training(_tiny(steps=5), tmp_path)
    assert not reached["end of step"] and list_checkpoints(tmp_path) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (needs the right to mount; skipped elsewhere)."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_real_full_disk_stops_with_one_line_and_resumes_identically(export, tmp_path, small_disk):
    import subprocess

    args = ["pairs", "build", "--teacher", export, "--views", "64", "pairs.shard_rows=1000"]
    run_nfm(*args, "--cache-dir", tmp_path / "ref")  # the same build with room: 2.5 MB of shards
    refused = run_nfm(*args, "--cache-dir", small_disk, check=False)  # the estimate does not fit: refused at once
    assert refused.returncode == 2 and "needs about 2.4 MB at" in refused.stderr and not caches(small_disk)
    args.append("pairs.check_space=false")  # write until the disk is really full
    full = run_nfm(*args, "--cache-dir", small_disk, check=False)
    (line,) = [x for x in full.stderr.splitlines() if "nfm: error" in x]
    assert full.returncode == 1 and "No space left on device" in line and "the disk is full" in line
    assert "Traceback" not in full.stderr
    (part,) = caches(small_disk)
    index = read_index(part)  # the index stayed valid
    assert not index["complete"] and 0 < len(index["shards"]) < 12 and check_index(part, index) == []
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    run_nfm(*args, "--cache-dir", small_disk)
    (ref,) = caches(tmp_path / "ref")
    assert read_index(part)["shards"] == read_index(ref)["shards"] and check_shards(part) == []
    assert not [p.name for p in part.iterdir() if p.name.startswith(".")]


def test_a_batch_larger_than_the_memory_is_refused_at_once(tmp_path, monkeypatch):
    import collections

    import psutil

    vm = collections.namedtuple("vm", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: vm(available=2**30))  # 1 GB free
    with pytest.raises(NFMError, match=r"train.batch_size=10000000 needs at least 4.8 GB .* than the 1.0 GB"):
        run_teacher_training(_tiny(steps=2, batch_size=10_000_000), tmp_path / "big")
    assert not (tmp_path / "big" / "export").exists()
    run_teacher_training(_tiny(steps=2, batch_size=32), tmp_path / "fits")


def test_tensorboard_tracker_logs_the_loss_through_accelerate(tmp_path):
    """train.log_with=tensorboard: accelerate's tracker writes an event file under RUN/trackers holding the
    values metrics.jsonl holds, at the same steps; an unknown tracker is one clear line."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    over = ["train.steps=4", "train.log_every=2", "train.sample_every=0", "train.log_with=tensorboard"]
    cfg = build_config(TeacherRunConfig, preset=TEACHER_PRESETS["tiny"], overrides=over)
    run_teacher_training(cfg, tmp_path / "run")
    logdir = tmp_path / "run" / "trackers" / "run"  # one tracker run, named after the run directory
    assert list(logdir.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert [s for s, _ in loss] == [2, 4] == [m["step"] for m in metrics]
    assert [v for _, v in loss] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    bad = build_config(TeacherRunConfig, preset=TEACHER_PRESETS["tiny"], overrides=[*over[:3], "train.log_with=nope"])
    with pytest.raises(NFMError, match="train.log_with=nope"):
        run_teacher_training(bad, tmp_path / "bad")


def test_a_known_tracker_whose_package_is_missing_stops_the_run_before_training(tmp_path):
    """accelerate drops such a tracker with a log line; the run would train to its end with no tracker."""
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    over = ["train.steps=4", "train.sample_every=0", "train.log_with=tensorboard,wandb"]
    cfg = build_config(TeacherRunConfig, preset=TEACHER_PRESETS["tiny"], overrides=over)
    with pytest.raises(NFMError, match=r"wandb cannot start here \(its package is not installed: pip install wandb\)"):
        run_teacher_training(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "export").exists()
