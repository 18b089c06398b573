"""Fault injection, second round (issue 23): the adversarial trial's breaks, each tried again. Nothing read from a
cache, a checkpoint or a download may run code, delete what is not a cache, pass for another cache, or reach a
caller unchecked. Each test builds the attack the trial found and asserts it is refused (or harmless)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from torch import nn

from nfm.core.checkpoint import list_checkpoints
from nfm.core.config import build_config
from nfm.core.data import DataConfig, load_data
from nfm.core.errors import NFMError
from nfm.core.io import load_tensors, save_tensors, sha256_file, write_json
from nfm.pairs.build import PairBuildConfig, build_pairs
from nfm.pairs.format import INDEX_NAME, ORIGIN_NAME, is_foreign, read_index
from nfm.pairs.kt import KTPairConfig, build_kt_pairs
from nfm.pairs.reader import PairCache
from nfm.pairs.reflow import build_reflow_pairs, check_regeneration
from nfm.pairs.share import install_cache
from nfm.pipeline.presets import TEACHER_PRESETS
from nfm.student import sdot
from nfm.student.reflow import StudentGenerator
from nfm.teacher.export import load_teacher
from nfm.teacher.train import TeacherRunConfig, run_teacher_training
from tests.conftest import dies_on_call, make_student_export, make_teacher_export, reforge_shards, run_nfm_inline

DATA = DataConfig(name="digits", held_out=0.9)  # 180 training images


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_teacher_export(tmp_path_factory.mktemp("teacher") / "export", data=DATA)


@pytest.fixture
def cache(export, tmp_path):
    return build_pairs(load_teacher(export), load_data(DATA), PairBuildConfig(shard_rows=60), tmp_path / "built").path


def _snapshot(cache_dir, tmp_path, change_index=None):
    """A Hub-like download of a cache: its files copied elsewhere, the index optionally edited."""
    snap = tmp_path / "hub-snapshot"
    shutil.copytree(cache_dir, snap)
    if change_index is not None:
        index = read_index(snap)
        change_index(index)
        (snap / INDEX_NAME).write_text(json.dumps(index))
    return snap


@pytest.fixture
def hub(monkeypatch):
    """`nfm pairs pull OWNER/NAME` served from a local directory (no Hub server is reachable here)."""
    import huggingface_hub

    served = {}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, revision, **kw: str(served[repo_id]))
    return served


# ----------------------------------------------------------------------------- 1. nothing from a cache runs


def test_a_pulled_cache_naming_code_as_its_teacher_never_runs_it(cache, tmp_path, hub):
    marker = tmp_path / "MARKER"

    def evil(index):
        index["teacher"].update(source="python:subprocess:run", arch={"args": f"touch {marker}", "shell": True})

    hub["evil/cache"] = _snapshot(cache, tmp_path, evil)
    root = tmp_path / "root"
    p = run_nfm_inline("pairs", "pull", "evil/cache", "--cache-dir", root)
    assert p.returncode == 0 and "marked foreign" in p.stdout
    key = cache.name
    for args in (["--samples", "64"], ["--all"], ["--samples", "0"]):
        p = run_nfm_inline("pairs", "verify", key, "--cache-dir", root, *args)
        assert p.returncode == 0 and "pass --teacher SPEC" in p.stdout and "FOREIGN" in p.stdout
        assert "python:subprocess:run" in p.stdout  # named as provenance, never loaded
    p = run_nfm_inline("pairs", "ls", "--cache-dir", root)
    assert "FOREIGN (hub:evil/cache)" in p.stdout
    assert not marker.exists()


# ----------------------------------------------------------------------------- 2. rm removes caches only


def test_pairs_rm_of_an_empty_name_in_a_directory_with_an_index_deletes_nothing(cache, tmp_path):
    here = tmp_path / "work"
    here.mkdir()
    (here / INDEX_NAME).write_text(json.dumps({"key": "x", "shards": []}))
    (here / "thesis.tex").write_text("years of work")
    p = run_nfm_inline("pairs", "rm", "", "--cache-dir", cache.parent, cwd=here)
    assert p.returncode == 2 and "no cache named" in p.stderr and "Traceback" not in p.stderr
    assert sorted(f.name for f in here.iterdir()) == [INDEX_NAME, "thesis.tex"]


def test_pairs_rm_refuses_a_directory_outside_the_cache_root_or_not_named_by_its_key(cache, tmp_path):
    stray = tmp_path / "project"
    stray.mkdir()
    (stray / INDEX_NAME).write_text(json.dumps({"key": "x", "shards": []}))
    (stray / "notes.txt").write_text("mine")
    p = run_nfm_inline("pairs", "rm", stray, "--cache-dir", cache.parent)
    assert p.returncode == 2 and "is not a cache under the cache root" in p.stderr and (stray / "notes.txt").exists()
    inside = cache.parent / "my-results"  # under the root, but not named by a key
    shutil.copytree(stray, inside)
    p = run_nfm_inline("pairs", "rm", inside, "--cache-dir", cache.parent)
    assert p.returncode == 2 and "not named by a cache key" in p.stderr and (inside / "notes.txt").exists()
    other = cache.parent / ("f" * 20)  # named like a key, its index names another
    shutil.copytree(cache, other)
    p = run_nfm_inline("pairs", "rm", "f" * 20, "--cache-dir", cache.parent)
    assert p.returncode == 2 and f"names key {cache.name!r}" in p.stderr and (other / INDEX_NAME).exists()


def test_pairs_rm_removes_the_cache_files_and_keeps_anything_else(cache, tmp_path):
    (cache / "README.md").write_text("a user's note, left in the cache directory")
    (cache / ".pairs-00001-of-00003.safetensors.ab12.tmp").write_bytes(b"half")  # a killed build's leftover
    p = run_nfm_inline("pairs", "rm", cache.name[:6], "--cache-dir", cache.parent)
    assert p.returncode == 0 and "left 1 other entries there: README.md" in p.stdout
    assert sorted(f.name for f in cache.iterdir()) == ["README.md"]


# ----------------------------------------------------------------------------- 3. keys proven, pulls foreign


def test_a_pulled_cache_whose_key_is_not_its_key_fields_hash_is_not_installed(cache, tmp_path):
    snap = _snapshot(cache, tmp_path, lambda ix: ix["key_fields"].update(seed=7))  # claims the key of seed 0
    with pytest.raises(NFMError, match="its key fields hash to"):
        install_cache(snap, tmp_path / "root")
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").iterdir())
    snap2 = _snapshot(cache, tmp_path / "b", lambda ix: ix.update(views=2))  # the index disagrees with its key
    with pytest.raises(NFMError, match="its index says views 2, its key fields 1"):
        install_cache(snap2, tmp_path / "root")


def test_a_poisoned_pulled_cache_is_refused_by_a_build_with_the_teacher(export, cache, tmp_path, hub):
    reforge_shards(cache, lambda cols: {**cols, "noise": torch.zeros_like(cols["noise"])})  # checksums recomputed
    hub["evil/poison"] = _snapshot(cache, tmp_path)
    root = tmp_path / "root"
    assert run_nfm_inline("pairs", "pull", "evil/poison", "--cache-dir", root).returncode == 0
    assert is_foreign(root / cache.name)
    with pytest.raises(NFMError, match="these are not this teacher's pairs"):
        build_pairs(load_teacher(export), load_data(DATA), PairBuildConfig(shard_rows=60), root, log=print)
    assert is_foreign(root / cache.name)  # refused, not used, not deleted
    from nfm.student.couplings import PairCoupling

    said = PairCoupling(PairCache(root / cache.name)).describe()  # a student pointed at it says so
    assert "WARNING: this cache came from hub:evil/poison and is not checked against its teacher" in said
    p = run_nfm_inline("pairs", "verify", cache.name, "--cache-dir", root, "--teacher", export)
    assert p.returncode == 2 and "these are not this teacher's pairs" in p.stderr


def test_an_honest_pulled_cache_is_checked_once_then_reused(export, cache, tmp_path, hub, capsys):
    hub["kind/cache"] = _snapshot(cache, tmp_path)
    root = tmp_path / "root"
    assert run_nfm_inline("pairs", "pull", "kind/cache", "--revision", "v1", "--cache-dir", root).returncode == 0
    args = (load_teacher(export), load_data(DATA), PairBuildConfig(shard_rows=60), root)
    res = build_pairs(*args, log=print)
    out = capsys.readouterr().out
    assert res.hit and "came from hub:kind/cache@v1: checking it" in out and "check reconstruction" in out
    assert not is_foreign(root / cache.name)
    assert json.loads((root / cache.name / ORIGIN_NAME).read_text())["verified"]["pairs_checked"] >= 3
    build_pairs(*args, log=print)  # checked: a plain hit from now on
    assert "checking it" not in capsys.readouterr().out


def test_a_cache_copied_under_another_key_is_refused(export, cache, tmp_path):
    cfg = PairBuildConfig(shard_rows=60, seed=1)
    teacher, data = load_teacher(export), load_data(DATA)
    from nfm.pairs.build import _plan

    other = _plan(teacher, data, cfg, cache.parent).cache_dir  # the directory a seed-1 build looks in
    shutil.copytree(cache, other)
    with pytest.raises(NFMError, match="moved or copied under another key"):
        build_pairs(teacher, data, cfg, cache.parent, log=print)


# ----------------------------------------------------------------------------- 4. readers state their kinds


class _Classifier(nn.Module):
    num_classes = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(64, 8)

    def forward(self, x):
        return self.lin(x.flatten(1))

    def fingerprint(self):
        return "classifier-8"


def test_a_logit_cache_is_refused_by_the_flow_student(tmp_path):
    from nfm.core.data import TensorImages

    data = load_data(DATA)
    u, y = data.raw(list(range(len(data))))
    eight = TensorImages("digits8", "train", u[y < 8], y[y < 8], levels=data.levels, num_classes=8)
    res = build_kt_pairs(_Classifier(), eight, KTPairConfig(views=1), tmp_path / "root", log=print)
    p = run_nfm_inline("student", "train", "--preset", "tiny", "--pairs", res.key, "--cache-dir", tmp_path / "root",
                       "--run-dir", tmp_path / "s", "train.batch_size=8")  # fmt: skip
    assert p.returncode == 2 and "holds a classifier's logits (an FM-KT cache); a flow student reads" in p.stderr
    assert f"nfm kt student train --pairs {res.key[:8]}" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "s" / "export").exists()
    with pytest.raises(NFMError, match="PairCache.open reads noise/data pairs"):
        __import__("nfm").PairCache.open(res.path)
    assert len(__import__("nfm").PairCache.open(res.path, kinds=("kt",))) == len(eight)


# ----------------------------------------------------------------------------- 5. every read path checks content


def test_torch_dataset_refuses_a_flipped_byte(cache):
    import nfm

    path = cache / "pairs-00002-of-00003.safetensors"
    data = bytearray(path.read_bytes())
    data[-300] ^= 0x10  # a byte of the noise column
    path.write_bytes(bytes(data))
    with pytest.raises(NFMError, match="does not match its checksum"):
        nfm.PairCache.open(cache).torch_dataset()
    assert len(nfm.PairCache.open(cache).torch_dataset(verify=False)) == 180  # asked for: unchecked


# ----------------------------------------------------------------------------- 6. reflow verify, every shard


@pytest.fixture(scope="module")
def reflow(tmp_path_factory):
    root = tmp_path_factory.mktemp("reflow")
    student = make_student_export(root / "student", DATA)
    gen = StudentGenerator(student, "cpu", "euler", 2)
    res = build_reflow_pairs(gen, 128, PairBuildConfig(shard_rows=16, batch_size=8), root / "pairs", log=print)
    return student, res.path


def test_reflow_verify_regenerates_from_every_shard(reflow, tmp_path):
    student, built = reflow
    cache = tmp_path / built.name
    shutil.copytree(built, cache)
    assert len(read_index(cache)["shards"]) == 8
    gen = StudentGenerator(student, "cpu", "euler", 2)
    assert check_regeneration(cache, gen)["worst_abs_error"] == 0.0
    reforge_shards(
        cache, lambda cols: {**cols, "data": -cols["data"]}, shards={5}
    )  # shard 6 of 8, checksums recomputed
    with pytest.raises(NFMError, match="regenerated images differ"):
        check_regeneration(cache, gen)  # one seeded batch from every shard
    p = run_nfm_inline("pairs", "verify", cache, "--from-student", student, "--all")
    assert p.returncode == 2 and "regenerated images differ" in p.stderr and "Traceback" not in p.stderr
    p = run_nfm_inline("pairs", "verify", cache, "--teacher", student)  # the wrong flag for reflow pairs
    assert p.returncode == 0 and "pass --from-student RUN" in p.stdout


@pytest.mark.parametrize("flag,value", [("--steps", "0"), ("--n", "0"), ("--steps", "-2")])
def test_reflow_build_refuses_zero_steps_or_pairs(reflow, tmp_path, flag, value):
    student, _ = reflow
    p = run_nfm_inline("pairs", "build", "--from-student", student, flag, value, "--cache-dir", tmp_path)
    assert p.returncode == 2 and f"{flag} must be >= 1, got {value}" in p.stderr
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- 7. a checkpoint carries its run


def _teacher_cfg(**train):
    cfg = build_config(TeacherRunConfig, preset=TEACHER_PRESETS["tiny"])
    return replace(cfg, train=replace(cfg.train, sample_every=0, steps=12, ckpt_every=4, keep_ckpts=3, **train))


def test_a_checkpoint_of_another_run_with_the_same_architecture_is_refused(tmp_path):
    cfg = _teacher_cfg()
    run_teacher_training(cfg, tmp_path / "mine")
    shutil.rmtree(tmp_path / "mine" / "export")
    run_teacher_training(_teacher_cfg(seed=1), tmp_path / "other")  # same model, another run
    theirs, mine = list_checkpoints(tmp_path / "other")[-1], list_checkpoints(tmp_path / "mine")
    shutil.rmtree(mine[-1])
    shutil.copytree(theirs, mine[-1])  # their step 12 where mine was
    run_teacher_training(cfg, tmp_path / "mine")
    log = (tmp_path / "mine" / "log.txt").read_text()
    assert "belongs to another run" in log and "(step 8)" in log.split("belongs to another run")[1]


# ----------------------------------------------------------------------------- 8. SD-OT artifacts checked on load


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    data = load_data(DATA)
    images, labels = data.tensors()
    cfg = sdot.SDOTConfig(steps=40, batch_size=128, save_every=10)
    d = tmp_path_factory.mktemp("sdot") / "w"
    sdot.fit_sdot(images, labels, cfg, d, log=print)
    return d, cfg, len(data), images, labels


def _copy(fitted, tmp_path):
    d = tmp_path / "w"
    shutil.copytree(fitted[0], d)
    return d


def _set_potentials(d, g):
    save_tensors(d / sdot.WEIGHTS_NAME, {"g": g, "share": torch.zeros(len(g))})
    meta = json.loads((d / sdot.META_NAME).read_text())
    write_json(d / sdot.META_NAME, {**meta, "sha256": sha256_file(d / sdot.WEIGHTS_NAME)})  # checksum recomputed


def test_sdot_metadata_of_the_wrong_type_is_one_line(fitted, tmp_path):
    d = _copy(fitted, tmp_path)
    (d / sdot.META_NAME).write_text("[]")
    with pytest.raises(NFMError, match="is corrupt \\(it is not the metadata of a semidiscrete OT fit\\)"):
        sdot.load_sdot(d, fitted[1], fitted[2])


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda g: g[:-3], "hold \\(177,\\) weights for 180 images"),
        (lambda g: torch.full_like(g, float("nan")), "hold NaN/Inf"),
        (lambda g: torch.full_like(g, 1e30), "reach 1e\\+30, more than a fit of these settings can"),
    ],
)
def test_sdot_potentials_are_checked_for_shape_finiteness_and_size(fitted, tmp_path, make, message):
    d = _copy(fitted, tmp_path)
    g, _ = sdot.load_sdot(d, fitted[1], fitted[2])
    assert g.abs().max() < sdot.potential_bound(fitted[1], fitted[2])  # a real fit is well inside the bound
    _set_potentials(d, make(g))
    with pytest.raises(NFMError, match=message):
        sdot.load_sdot(d, fitted[1], fitted[2])


def test_a_flipped_byte_in_the_sdot_partial_state_restarts_the_fit_identically(fitted, tmp_path, monkeypatch):
    _, cfg, _, images, labels = fitted
    real = dies_on_call(monkeypatch, sdot, "ascend", 3)
    with pytest.raises(KeyboardInterrupt):
        sdot.fit_sdot(images, labels, cfg, tmp_path / "b", log=print)
    monkeypatch.setattr(sdot, "ascend", real)
    partial = tmp_path / "b" / sdot.PARTIAL_NAME
    data = bytearray(partial.read_bytes())
    data[-20] ^= 0x01  # a byte of a saved iterate
    partial.write_bytes(bytes(data))
    said = []
    sdot.fit_sdot(images, labels, cfg, tmp_path / "b", log=said.append)
    assert any("does not match its checksum" in s and "fitting from the start" in s for s in said)
    a, b = (load_tensors(d / sdot.WEIGHTS_NAME) for d in (fitted[0], tmp_path / "b"))
    assert torch.equal(a["g"], b["g"])  # the same weights as an uninterrupted fit


# ----------------------------------------------------------------------------- smaller


def test_overrides_after_an_option_are_overrides(export, tmp_path):
    p = run_nfm_inline("pairs", "build", "--teacher", export, "--cache-dir", tmp_path, "pairs.batch_size=0")
    assert p.returncode == 2 and "'pairs.batch_size' must be >= 1, got 0" in p.stderr  # read, then refused
    assert "unrecognized arguments" not in p.stderr


def test_a_symlinked_shard_gives_its_advice_once(cache, tmp_path):
    victim = cache / "pairs-00003-of-00003.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(victim.read_bytes())
    victim.unlink()
    victim.symlink_to(outside)
    with pytest.raises(NFMError) as e:
        PairCache(cache)
    assert str(e.value).count("nfm pairs rm") == 1 and "symbolic link" in str(e.value)
