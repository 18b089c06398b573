"""Stage two: the pair cache — contents, keys, resume, corruption, multi-process, the reader."""

import json
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nfm.core.data import DataConfig, load_data
from nfm.core.errors import NFMError
from nfm.pairs.build import PairBuildConfig, build_pairs, pair_noise
from nfm.pairs.format import INDEX_NAME, ShardFile, read_index
from nfm.pairs.reader import PairCache, PairReader
from nfm.pairs.verify import check_shards, reconstruction_error
from nfm.teacher.export import load_teacher
from tests.conftest import caches, make_teacher_export, run_nfm

DATA = DataConfig(name="digits", held_out=0.9)  # 180 training images: fast


def make_export(path: Path, seed: int = 0, noise_std: float = 0.1, width: int = 32, blocks: int = 2) -> Path:
    return make_teacher_export(path, seed, noise_std, width, blocks, DATA)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("teacher") / "export")


def build(export, root, cfg=None, data=DATA, logs=None):
    cfg = cfg or PairBuildConfig()
    teacher = load_teacher(export)
    return build_pairs(
        teacher,
        load_data(data, cfg.split),
        cfg,
        root,
        teacher_info={"source": str(export)},
        log=(logs.append if logs is not None else lambda *a: None),
    ).path


def test_build_contents(export, tmp_path):
    cfg = PairBuildConfig(views=2, shard_rows=100, dtype="float32")
    cache_dir = build(export, tmp_path, cfg)
    index = read_index(cache_dir)
    data = load_data(DATA)
    assert index["complete"] and index["total_rows"] == 2 * len(data) == 360
    assert [s["file"] for s in index["shards"]] == [f"pairs-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    for key in ("key", "teacher", "data", "noise_std", "sigma_f", "views", "seed", "dtypes", "shapes"):
        assert key in index
    # the index declares its kind and the columns of its shards, each with what it means
    assert index["kind"] == "teacher" and list(index["columns"]) == ["noise", "data", "label", "index", "view"]
    assert "encode(x + eta * eps) / sigma_f" in index["columns"]["noise"]
    cache = PairCache(cache_dir)
    cols = {
        k: torch.cat([cache.shard(i).read(k) for i in range(4)]) for k in ("noise", "data", "label", "index", "view")
    }
    assert cols["noise"].dtype == torch.float32 and cols["data"].dtype == torch.uint8
    # the noise end is unit-variance (sigma_f was estimated over every pair here)
    assert cols["noise"].pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-4)
    # the data end is the clean image, with its label, for every (row, view)
    x, y = data.tensors()
    torch.testing.assert_close(cache.to_float(cols["data"]), x[cols["index"]])
    assert torch.equal(cols["label"], y[cols["index"]])
    assert sorted((cols["index"] * 2 + cols["view"]).tolist()) == list(range(360))
    # noise = encode(x + eta * eps(seed, row, view)) / sigma_f, exactly what the teacher gives
    teacher = load_teacher(export)
    ids = cols["index"][:7] * 2 + cols["view"][:7]
    eps = pair_noise(0, ids, (1, 8, 8))
    z = teacher.encode(x[cols["index"][:7]] + 0.1 * eps, y[cols["index"][:7]])
    torch.testing.assert_close(cols["noise"][:7], z / index["sigma_f"], atol=1e-6, rtol=1e-5)
    rec = reconstruction_error(cache_dir, teacher, samples=32)
    assert rec["worst_abs_error"] < 1e-4


def test_float16_noise_and_reconstruction(export, tmp_path):
    cache_dir = build(export, tmp_path, PairBuildConfig())
    cache = PairCache(cache_dir)
    assert cache.shard(0).read("noise").dtype == torch.float16
    assert reconstruction_error(cache_dir, load_teacher(export), samples=32)["worst_abs_error"] < 1e-2


def test_second_build_is_a_cache_hit(export, tmp_path):
    first = build(export, tmp_path)
    shard = next(first.glob("pairs-*.safetensors"))
    mtime = shard.stat().st_mtime_ns
    logs = []
    t0 = time.perf_counter()
    assert build(export, tmp_path, logs=logs) == first
    assert time.perf_counter() - t0 < 10
    assert any("cache hit" in line for line in logs)
    assert shard.stat().st_mtime_ns == mtime


def test_an_index_written_before_the_kind_was_declared_still_reads(export, tmp_path):
    """A teacher cache of before: no `kind`, no `columns` in its index; the same key, kind and rows, and a
    build of the same settings finds it (a hit)."""
    cfg = PairBuildConfig(views=1, shard_rows=100)
    cache_dir = build(export, tmp_path, cfg)
    before = PairCache(cache_dir)
    index = read_index(cache_dir)
    old = {k: v for k, v in index.items() if k not in ("kind", "columns")}
    (cache_dir / INDEX_NAME).write_text(json.dumps(old))
    cache = PairCache(cache_dir)
    assert (cache.key, cache.kind, cache.columns, len(cache)) == (before.key, "teacher", before.columns, len(before))
    logs = []
    assert build(export, tmp_path, cfg, logs=logs) == cache_dir and any("pair cache hit" in m for m in logs)
    (cache_dir / INDEX_NAME).write_text(json.dumps({**old, "kind": "kt"}))  # a kind its key fields contradict
    with pytest.raises(NFMError, match=r"holds unknown \('kt'\)"):
        PairCache(cache_dir)


@pytest.mark.parametrize("scale", [0.0, 2.0])
def test_eta_scale_encodes_with_that_multiple_of_the_teachers_eta(export, tmp_path, scale):
    cfg = PairBuildConfig(dtype="float32", eta_scale=scale)
    cache_dir = build(export, tmp_path, cfg)
    assert cache_dir.name != build(export, tmp_path).name  # its own cache
    index = read_index(cache_dir)
    assert index["noise_std"] == pytest.approx(0.1 * scale) and index["teacher_noise_std"] == 0.1
    cache = PairCache(cache_dir)
    noise, idx, view = (cache.shard(0).read(k)[:5] for k in ("noise", "index", "view"))
    x, y = load_data(DATA).tensors()
    teacher = load_teacher(export)
    z = teacher.encode(x[idx] + 0.1 * scale * pair_noise(0, idx + view, (1, 8, 8)), y[idx])
    torch.testing.assert_close(noise, z / index["sigma_f"], atol=1e-6, rtol=1e-5)
    # verify adds back the pairs' own eta: decode(noise) is x + 0.1 * scale * eps
    assert reconstruction_error(cache_dir, teacher, samples=16)["worst_abs_error"] < 1e-4


@pytest.mark.parametrize("change", ["views", "seed", "dtype", "eta", "weights", "data", "split"])
def test_every_input_of_the_key_changes_it(export, tmp_path, change):
    base = build(export, tmp_path).name
    cfg, data, exp = PairBuildConfig(), DATA, export
    if change == "views":
        cfg = replace(cfg, views=2)
    elif change == "seed":
        cfg = replace(cfg, seed=1)
    elif change == "dtype":
        cfg = replace(cfg, dtype="float32")
    elif change == "eta":
        exp = make_export(tmp_path / "eta", noise_std=0.2)
    elif change == "weights":
        exp = make_export(tmp_path / "w", seed=1)
    elif change == "data":
        data = replace(DATA, held_out=0.85)
    elif change == "split":
        cfg = replace(cfg, split="test")
    assert build(exp, tmp_path, cfg, data).name != base


def _shards(cache_dir):
    return {p.name: p.read_bytes() for p in sorted(Path(cache_dir).glob("pairs-*.safetensors"))}


def test_killed_build_resumes_to_a_byte_identical_cache(tmp_path):
    exp = make_export(tmp_path / "t", width=64, blocks=4)
    args = ["build", "--teacher", str(exp), "--views", "4", "pairs.shard_rows=32", "data.held_out=0.2"]
    run_nfm("pairs", *args, "--cache-dir", tmp_path / "a")
    (ref,) = caches(tmp_path / "a")
    n_shards = len(_shards(ref))
    assert n_shards > 100

    proc = run_nfm("pairs", *args, "--cache-dir", tmp_path / "b", background=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        dirs = caches(tmp_path / "b") if (tmp_path / "b").exists() else []
        if dirs and len(list(dirs[0].glob("pairs-*.safetensors"))) >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (part,) = caches(tmp_path / "b")
    visible = list(part.glob("pairs-*.safetensors"))
    assert 3 <= len(visible) < n_shards, "the kill must land mid-build"
    for p in visible:  # no half shard is ever visible under a final name
        ShardFile(p)
    with pytest.raises(NFMError, match="incomplete"):
        PairCache(part)
    run_nfm("pairs", *args, "--cache-dir", tmp_path / "b")
    assert _shards(part) == _shards(ref)
    ia, ib = read_index(ref), read_index(part)
    assert ia["shards"] == ib["shards"] and ia["sigma_f"] == ib["sigma_f"] and ib["complete"]
    assert not list(part.glob(".*.tmp"))


def test_two_process_build_equals_one_process(export, tmp_path):
    args = ["pairs", "build", "--teacher", str(export), "--views", "3", "pairs.shard_rows=50"]
    run_nfm(*args, "--cache-dir", tmp_path / "one", env={"OMP_NUM_THREADS": "1"})
    run_nfm(*args, "--cache-dir", tmp_path / "two", nproc=2)
    (one,), (two,) = caches(tmp_path / "one"), caches(tmp_path / "two")
    assert one.name == two.name
    assert _shards(one) == _shards(two) and len(_shards(one)) == 11
    assert read_index(one)["shards"] == read_index(two)["shards"]


def test_flipped_byte_is_named_by_verify(export, tmp_path):
    cache_dir = build(export, tmp_path, PairBuildConfig(shard_rows=60))
    victim = cache_dir / "pairs-00002-of-00003.safetensors"
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0x01
    victim.write_bytes(bytes(data))
    assert check_shards(cache_dir) == ["pairs-00002-of-00003.safetensors: sha256 mismatch (corrupt)"]
    p = run_nfm("pairs", "verify", cache_dir.name, "--cache-dir", tmp_path, check=False)
    assert p.returncode == 2 and "pairs-00002-of-00003.safetensors: sha256 mismatch" in p.stderr
    assert "Traceback" not in p.stderr


def test_truncated_or_missing_shard_is_named_on_read(export, tmp_path):
    cache_dir = build(export, tmp_path, PairBuildConfig(shard_rows=60))
    victim = cache_dir / "pairs-00003-of-00003.safetensors"
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(NFMError, match="pairs-00003-of-00003.safetensors: .* bytes, index says .*truncated"):
        PairCache(cache_dir)
    with pytest.raises(NFMError, match="pairs-00003-of-00003.safetensors is truncated or corrupt"):
        ShardFile(victim)
    victim.unlink()
    with pytest.raises(NFMError, match="does not match its index: pairs-00003-of-00003.safetensors: missing"):
        PairCache(cache_dir)


@pytest.mark.parametrize("bad", ["../evil.safetensors", "/etc/passwd", "sub/pairs-00001-of-00001.safetensors"])
def test_index_pointing_outside_the_cache_is_rejected(export, tmp_path, bad):
    cache_dir = build(export, tmp_path)
    index = json.loads((cache_dir / INDEX_NAME).read_text())
    index["shards"][0]["file"] = bad
    (cache_dir / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(NFMError, match="not a plain shard file name"):
        PairCache(cache_dir)


def test_nonfinite_pairs_are_refused_or_dropped_and_counted(export, tmp_path):
    teacher = load_teacher(export)
    original = teacher.encode

    def broken(x, y):  # NaN for every image of class 3
        z = original(x, y)
        return torch.where((y == 3).view(-1, 1, 1, 1), torch.full_like(z, float("nan")), z)

    teacher.encode = broken
    data = load_data(DATA)
    n3 = int((data.labels == 3).sum())
    with pytest.raises(NFMError, match=rf"{n3} pairs encode to NaN/Inf \(allowed: 0"):
        build_pairs(teacher, data, PairBuildConfig(), tmp_path, log=lambda *a: None)
    cache_dir = build_pairs(teacher, data, PairBuildConfig(max_nonfinite=0.2), tmp_path, log=lambda *a: None).path
    index = read_index(cache_dir)
    assert index["dropped"] == n3 and index["total_rows"] == len(data) - n3
    assert torch.isfinite(PairCache(cache_dir).shard(0).read("noise")).all()


def test_data_that_does_not_match_the_teacher_is_refused(export, tmp_path, monkeypatch):
    teacher = load_teacher(export)
    data = load_data(DATA)
    monkeypatch.setattr(data, "image_shape", (3, 8, 8))
    with pytest.raises(NFMError, match="does not match the teacher's image shape"):
        build_pairs(teacher, data, PairBuildConfig(), tmp_path, log=lambda *a: None)


def test_reader_covers_every_row_once_per_epoch_across_ranks(export, tmp_path):
    cache = PairCache(build(export, tmp_path, PairBuildConfig(views=2, shard_rows=37)))  # 360 pairs, 10 shards
    streams = [PairReader(cache, seed=5, rank=r, world=2, chunk=50).batches(18) for r in (0, 1)]
    epochs = []
    for _ in range(2):  # 10 steps of 2 x 18 rows = one epoch
        seen = []
        for _ in range(10):
            for it in streams:
                noise, data, label, index = next(it)
                assert noise.shape == (18, 1, 8, 8) and data.dtype == torch.float32 and label.dtype == torch.int64
                seen += [(int(i), round(float(n.sum()), 3)) for i, n in zip(index, noise)]
        every = [
            (int(i), round(float(n.float().sum()), 3))
            for k in range(10)
            for i, n in zip(cache.shard(k).read("index"), cache.shard(k).read("noise"))
        ]
        assert len(set(every)) == 360 and sorted(seen) == sorted(every)
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_n_processes_see_the_global_batches_of_one_process(export, tmp_path):
    cache = PairCache(build(export, tmp_path, PairBuildConfig(views=2, shard_rows=37)))
    one = PairReader(cache, seed=3, chunk=11).batches(24)
    parts = [PairReader(cache, seed=3, rank=r, world=3, chunk=11).batches(8) for r in range(3)]
    for _ in range(40):  # crosses epochs
        whole = next(one)
        split = [next(p) for p in parts]
        for j in range(4):
            assert torch.equal(whole[j], torch.cat([s[j] for s in split]))


def test_reader_batches_resume_mid_stream(export, tmp_path):
    cache = PairCache(build(export, tmp_path, PairBuildConfig(views=2, shard_rows=37)))
    reader = PairReader(cache, seed=1, rank=1, world=2, chunk=7)  # chunks smaller than a batch
    it = reader.batches(16)
    stream = [next(it) for _ in range(30)]  # crosses an epoch (360 rows = 11.25 global batches)
    it2 = PairReader(cache, seed=1, rank=1, world=2, chunk=50).batches(16, start=17)
    for want in stream[17:]:
        got = next(it2)
        for a, b in zip(want, got):
            assert torch.equal(a, b)


def test_pairs_build_defaults_to_the_pairs_nfm_run_builds(export, tmp_path, monkeypatch):
    """`nfm pairs build` on a digits teacher builds what `nfm run --preset digits` does (32 views), not 1 view;
    --views and --preset change it; and the student's sampler defaults agree between the API and the command."""
    import inspect

    import nfm
    import nfm.pairs.build as pb
    from nfm.pipeline.cli import build_parser
    from tests.conftest import run_nfm_inline

    seen = []
    monkeypatch.setattr(pb, "build_pairs", lambda teacher, data, cfg, *a, **k: seen.append(cfg.views) or 1 / 0)
    for flags, views in (
        ([], 32),
        (["--views", "2"], 2),
        (["--preset", "fashion-mnist"], 2),
        (["--preset", "tiny"], 1),
    ):
        run_nfm_inline("pairs", "build", "--teacher", export, "--cache-dir", tmp_path, *flags)
        assert seen.pop() == views, flags
    p = run_nfm_inline("pairs", "build", "--teacher", export, "--preset", "nope", "--cache-dir", tmp_path)
    assert p.returncode == 2 and "nope" in p.stderr and not seen
    cli = build_parser().parse_args(["student", "sample", "RUN"])
    assert inspect.signature(nfm.Student.sample).parameters["steps"].default == cli.steps == 4


def test_nfm_doctor_reports_versions_caches_data_and_feature_networks(export, tmp_path):
    import json

    import nfm
    from tests.conftest import run_nfm_inline

    good = build(export, tmp_path / "root", PairBuildConfig(views=1))
    bad = build(export, tmp_path / "root", PairBuildConfig(views=1, seed=1))
    index = json.loads((bad / INDEX_NAME).read_text())
    (bad / INDEX_NAME).write_text(json.dumps({**index, "key": good.name}))  # claims another cache's key
    p = run_nfm_inline("doctor", "--cache-dir", tmp_path / "root")
    out = p.stdout
    assert p.returncode == 0 and out.startswith(f"nfm {nfm.__version__} (") and "packages: torch " in out
    assert f"  {good.name}  teacher " in out and "complete, built here" in out
    assert f"  {bad.name}  UNREADABLE: " in out and "digits         found: 1x8x8, 10 classes" in out
    assert "nfm-digits                 installed (128-d features)" in out


def test_cache_dir_may_name_the_folder_nfm_cache_dir_names(export, tmp_path):
    """NFM_CACHE_DIR=X keeps its caches in X/pairs: --cache-dir X finds them there, as --cache-dir X/pairs does."""
    from tests.conftest import run_nfm_inline

    path = build(export, tmp_path / "x" / "pairs", PairBuildConfig(views=1))
    for root in (tmp_path / "x", tmp_path / "x" / "pairs"):
        listing = run_nfm_inline("pairs", "ls", "--cache-dir", root).stdout
        assert path.name in listing and f"(1 caches under {tmp_path / 'x' / 'pairs'})" in listing
    assert path.name in run_nfm_inline("pairs", "ls", env={"NFM_CACHE_DIR": str(tmp_path / "x")}).stdout


def test_pairs_commands_end_to_end(export, tmp_path):
    def nfm(*args, check=True):
        return run_nfm("pairs", *args, "--cache-dir", tmp_path, check=check)

    out = nfm("build", "--teacher", str(export), "--views", "2").stdout
    key = out.split("key: ")[1].split()[0]
    assert f"path: {tmp_path / key}" in out and "pair cache built" in out
    assert "cache hit" in nfm("build", "--teacher", str(export), "--views", "2").stdout
    listing = nfm("ls").stdout
    assert key in listing and "digits[train]" in listing and "360" in listing
    bytes_only = nfm("verify", key[:6]).stdout  # without a teacher: the bytes, and what to pass for the rest
    assert "checksums and key ok" in bytes_only and "pass --teacher SPEC" in bytes_only and "bytes OK" in bytes_only
    verify = nfm("verify", key[:6], "--teacher", str(export)).stdout
    assert "checksums and key ok" in verify and "worst |decode" in verify and f"pair cache {key}: OK" in verify
    assert "removed" in nfm("rm", key).stdout
    assert not (tmp_path / key).exists()
    p = nfm("verify", key, check=False)
    assert p.returncode == 2 and f"no pair cache {key!r}" in p.stderr and "Traceback" not in p.stderr
