"""The Python surface: nfm.Student / nfm.Teacher / nfm.PairCache / nfm.run, and the notebook-style example."""

import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import nfm
from nfm.core.data import DataConfig, load_data
from nfm.core.errors import NFMError
from nfm.pairs.build import PairBuildConfig, build_pairs
from nfm.student.models import StudentModelConfig, build_student
from nfm.student.paths import ProbPath
from nfm.student.sampling import sample_ode
from nfm.student.train import FlowConfig
from nfm.teacher.export import load_teacher
from tests.conftest import make_teacher_export

REPO = Path(__file__).resolve().parents[1]
DATA = DataConfig(name="digits", held_out=0.9)


def _student(path: str = "ve", classes: int = 10) -> nfm.Student:
    torch.manual_seed(0)
    mc = StudentModelConfig(arch="mlp", in_channels=1, img_size=8, num_classes=classes, width=32, depth=2)
    model = build_student(mc).eval()
    meta = {"kind": "student", "format_version": 1, "model": asdict(mc), "flow": asdict(FlowConfig(path=path))}
    return nfm.Student(model, {**meta, "data": asdict(DATA)})


def test_student_sample_applies_its_own_prior_and_classes():
    """The ve path starts from sigma_max * eps: sample() must scale the noise itself (what a user once had
    to pass by hand as prior_scale), and cycle the classes when no labels are given."""
    s = _student("ve")
    got = s.sample(6, solver="euler", steps=2, seed=3)
    eps = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    scale = ProbPath.from_flow(s.config["flow"]).prior_scale
    assert scale == 20.0
    want, _ = sample_ode(s.model, eps * scale, torch.arange(6) % 10, solver="euler", steps=2, num_classes=10)
    assert torch.equal(got, want.clamp(-1, 1))
    one_class, _ = sample_ode(s.model, eps * scale, torch.full((6,), 7), solver="euler", steps=2, num_classes=10)
    assert torch.equal(s.sample(6, labels=7, steps=2, seed=3), one_class.clamp(-1, 1))
    pil = s.sample(3, steps=1, seed=0, output="pil")
    assert len(pil) == 3 and pil[0].size == (8, 8) and pil[0].mode == "L"
    u8 = s.sample(3, steps=1, seed=0, output="uint8")
    assert u8.dtype == torch.uint8 and np.array_equal(np.asarray(pil[1]), u8[1, 0].numpy())
    with pytest.raises(NFMError, match="classes 0..9"):
        s.sample(2, labels=[0, 10])
    with pytest.raises(NFMError, match="2 entries for 3 samples"):
        s.sample(3, labels=[0, 1])
    with pytest.raises(NFMError, match="output must be"):
        s.sample(1, output="png")
    with pytest.raises(NFMError, match="no classes"):
        _student("linear", classes=0).sample(1, labels=1)


def test_student_save_and_from_pretrained_round_trip(tmp_path):
    s = _student("linear")
    s.save_pretrained(tmp_path / "exp")
    assert {p.name for p in (tmp_path / "exp").iterdir()} == {"model.safetensors", "config.json"}
    back = nfm.Student.from_pretrained(tmp_path / "exp", device="cpu")
    assert back.config == s.config and back.image_shape == (1, 8, 8) and back.num_classes == 10
    assert torch.equal(back.sample(4, steps=3, seed=5), s.sample(4, steps=3, seed=5))
    with pytest.raises(NFMError, match="neither a local directory nor a Hugging Face Hub repo id"):
        nfm.Student.from_pretrained(tmp_path / "missing" / "dir")


def test_a_push_that_cannot_reach_the_hub_fails_in_one_line(tmp_path, monkeypatch):
    """No Hub here (offline mode, or a connection refused): the student's push and `nfm pairs push` say what to
    check, not the HTTP library's exception or "probably a bug"."""
    from huggingface_hub import constants

    from tests.conftest import run_nfm_inline

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_token")
    for offline, error in ((True, "OfflineModeIsEnabled"), (False, "ConnectError")):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        with pytest.raises(NFMError, match=rf"could not push to 'me/student' on the Hugging Face Hub \({error}: "):
            _student("linear").push_to_hub("me/student")
    data = load_data(DATA)
    cache = build_pairs(load_teacher(make_teacher_export(tmp_path / "t")), data, PairBuildConfig(), tmp_path / "root")
    p = run_nfm_inline("pairs", "push", cache.key, "me/pairs", "--cache-dir", tmp_path / "root")
    assert p.returncode == 2 and "could not push to 'me/pairs' on the Hugging Face Hub (ConnectError" in p.stderr
    assert "probably a bug" not in p.stderr and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_hub_ids_download_and_push_through_huggingface_hub(tmp_path, monkeypatch):
    """No Hub server here: offline, a repo id fails in one line; the transport (snapshot_download,
    HfApi.create_repo / upload_folder) is stubbed to check what is sent and read."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NFMError, match="could not fetch 'someone/nfm-student' from the Hugging Face Hub"):
        nfm.Student.from_pretrained("someone/nfm-student")

    s, sent = _student("linear"), {}

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            sent["repo"] = (repo_id, private)

        def upload_folder(self, repo_id, folder_path, commit_message):
            sent["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            (tmp_path / "hub").mkdir()
            for p in Path(folder_path).iterdir():
                (tmp_path / "hub" / p.name).write_bytes(p.read_bytes())
            return type("Info", (), {"commit_url": f"https://hf.co/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert s.push_to_hub("me/digits-student", private=True) == "https://hf.co/me/digits-student/commit/1"
    assert sent == {"repo": ("me/digits-student", True), "files": ["config.json", "model.safetensors"]}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, revision: str(tmp_path / "hub"))
    back = nfm.Student.from_pretrained("me/digits-student")
    assert torch.equal(back.sample(2, steps=2, seed=0), s.sample(2, steps=2, seed=0))
    from tests.conftest import run_nfm_inline  # the command takes the same ids

    p = run_nfm_inline("student", "sample", "me/digits-student", "--n", "4", "--out", tmp_path / "out" / "s")
    assert p.returncode == 0 and (tmp_path / "out" / "s.png").is_file(), p.stderr


def test_teacher_from_pretrained_samples_and_saves(tmp_path):
    export = make_teacher_export(tmp_path / "t" / "export")
    t = nfm.Teacher.from_pretrained(export, device="cpu")
    assert t.image_shape == (1, 8, 8) and t.num_classes == 10
    flow = load_teacher(export)
    eps = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 1, 1, 1])
    want = flow.denoise(flow.decode(eps * flow.prior_std, y), y).clamp(-1, 1)
    assert torch.allclose(t.sample(4, labels=1, seed=2), want, atol=1e-6)
    t.save_pretrained(tmp_path / "copy")
    assert load_teacher(tmp_path / "copy").fingerprint() == flow.fingerprint()


def test_a_pair_cache_opens_as_a_dataset_without_a_copy(tmp_path):
    import pyarrow as pa

    export = make_teacher_export(tmp_path / "t" / "export", data=DATA)
    cache = build_pairs(load_teacher(export), load_data(DATA), PairBuildConfig(shard_rows=60), tmp_path / "pairs")
    pairs = nfm.PairCache.open(cache.path.name[:8], root=tmp_path / "pairs")
    before = pa.total_allocated_bytes()
    ds = pairs.to_dataset()
    # nothing of the shards' bytes was copied into Arrow's memory, nothing was written beside the cache
    assert pa.total_allocated_bytes() - before < 1024
    assert not ds.cache_files and sorted(p.name for p in tmp_path.rglob("*.arrow")) == []
    # the Arrow values live in the shard file's own mapping (Linux: /proc/self/maps names the file)
    values = ds.data.column("noise").chunk(0).storage.flatten().flatten().flatten()
    addr, shard = values.buffers()[1].address, str((cache.path / pairs.shards[0]["file"]).resolve())
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
    owner = [m[-1] for m in maps if int(m[0].split("-")[0], 16) <= addr < int(m[0].split("-")[1], 16)]
    assert owner == [shard]
    assert len(ds) == len(pairs) == 180 and ds.column_names == ["noise", "data", "label", "index"]
    rows = list(pairs.rows(chunk=50))
    noise = torch.cat([r["noise"] for r in rows])
    image = torch.cat([r["image"] for r in rows])
    labels = torch.cat([r["label"] for r in rows])
    got = ds[:]
    assert torch.equal(got["noise"], noise) and torch.equal(pairs.to_float(got["data"]), image)
    assert torch.equal(got["label"], labels) and torch.equal(ds[97]["noise"].float(), noise[97])
    # the dataset's images are the training images the pairs were built from (index -> image)
    train = load_data(DATA).tensors()[0]
    assert torch.allclose(pairs.to_float(got["data"]), train[got["index"]], atol=1e-6)
    n, x, y = pairs.torch_dataset()[97]
    assert torch.equal(n, noise[97]) and torch.equal(x, image[97]) and y == labels[97]
    with pytest.raises(NFMError, match="no pair cache"):
        nfm.PairCache.open("abcdef12", root=tmp_path / "pairs")


def test_a_tampered_shard_is_refused_before_it_becomes_a_dataset(tmp_path):
    export = make_teacher_export(tmp_path / "t" / "export", data=DATA)
    cache = build_pairs(load_teacher(export), load_data(DATA), PairBuildConfig(shard_rows=60), tmp_path / "pairs")
    pairs = nfm.PairCache.open(cache.path)
    shard = cache.path / pairs.shards[1]["file"]
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF  # one byte of the last tensor: same size, other content
    shard.write_bytes(bytes(raw))
    with pytest.raises(NFMError, match="does not match its checksum"):
        pairs.to_dataset()
    assert len(pairs.to_dataset(verify=False)) == 180  # the user's explicit choice


def test_a_pair_cache_goes_to_the_hub_and_back_checked_byte_for_byte(tmp_path, monkeypatch):
    """No Hub server here: the transport (HfApi.create_repo / create_commit, snapshot_download) is stubbed. The
    push sends the index, the shards (read where they are) and a card in one commit; the pull installs the
    snapshot under its key after checking every byte, and a tampered download installs nothing."""
    import huggingface_hub

    from tests.conftest import run_nfm_inline

    export = make_teacher_export(tmp_path / "t" / "export", data=DATA)
    cache = build_pairs(load_teacher(export), load_data(DATA), PairBuildConfig(shard_rows=60), tmp_path / "pairs")
    pairs, hub, sent = nfm.PairCache.open(cache.path), tmp_path / "hub" / "snapshot", {}

    class FakeApi:
        def create_repo(self, repo_id, repo_type, private, exist_ok):
            sent["repo"] = (repo_id, repo_type, private)

        def create_commit(self, repo_id, repo_type, operations, commit_message):
            hub.mkdir(parents=True)
            blobs = hub.parent / "blobs"
            blobs.mkdir()
            for op in operations:  # like the Hub cache: the snapshot's files are links into a blob store
                src = op.path_or_fileobj
                data = src if isinstance(src, bytes) else Path(src).read_bytes()
                (blobs / op.path_in_repo).write_bytes(data)
                (hub / op.path_in_repo).symlink_to(blobs / op.path_in_repo)
            sent["files"] = sorted(op.path_in_repo for op in operations)
            sent["read_in_place"] = [o.path_or_fileobj for o in operations if not isinstance(o.path_or_fileobj, bytes)]
            return type("Info", (), {"commit_url": f"https://hf.co/datasets/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert pairs.push_to_hub("me/digits-pairs") == "https://hf.co/datasets/me/digits-pairs/commit/1"
    shards = [s["file"] for s in pairs.shards]
    assert sent["repo"] == ("me/digits-pairs", "dataset", False) and len(shards) == 3
    assert sent["files"] == sorted(["README.md", "pairs.index.json", *shards])
    assert sent["read_in_place"] == [str(cache.path / "pairs.index.json")] + [str(cache.path / f) for f in shards]
    assert 'PairCache.from_pretrained("me/digits-pairs")' in (hub / "README.md").read_text()

    calls = []
    monkeypatch.setattr(
        huggingface_hub,
        "snapshot_download",
        lambda repo_id, revision, repo_type: calls.append((repo_id, repo_type)) or str(hub),
    )
    root = tmp_path / "other-machine"
    got = nfm.PairCache.from_pretrained("me/digits-pairs", root=root)
    assert calls == [("me/digits-pairs", "dataset")] and got.dir == root / pairs.key
    assert not any(p.is_symlink() for p in got.dir.iterdir()) and sorted(p.name for p in root.iterdir()) == [pairs.key]
    a, b = pairs.to_dataset()[:], got.to_dataset()[:]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert nfm.PairCache.from_pretrained(pairs.key[:6], root=root).dir == got.dir  # now a local key
    assert run_nfm_inline("pairs", "pull", "me/digits-pairs", "--cache-dir", root).returncode == 0  # installed: kept

    # a download whose shard changed after the push: refused, nothing appears under the key
    blob = (hub / shards[2]).resolve()
    raw = bytearray(blob.read_bytes())
    raw[-1] ^= 0xFF
    blob.write_bytes(bytes(raw))
    fresh = tmp_path / "third-machine"
    with pytest.raises(NFMError, match="does not match its index"):
        nfm.PairCache.from_pretrained("me/digits-pairs", root=fresh)
    assert not fresh.exists() or list(fresh.iterdir()) == []
    # and a cache that is not what its index says is not pushed
    shard = cache.path / shards[0]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(NFMError, match="nothing was shared"):
        pairs.push_to_hub("me/digits-pairs")
    p = run_nfm_inline("pairs", "pull", "not-a-repo-id")
    assert p.returncode != 0 and "not a Hugging Face Hub repo id (owner/name)" in p.stderr


@pytest.mark.slow
def test_the_notebook_example_runs(tmp_path):
    """examples/quickstart.py: nfm.run on the tiny preset, then every object of the API."""
    p = run_nfm_script(REPO / "examples" / "quickstart.py", tmp_path / "work")
    assert "students: nfm, independent" in p.stdout and "pair cache" in p.stdout, p.stdout
    assert (tmp_path / "work" / "nfm-sample-0.png").is_file()


def run_nfm_script(script: Path, work: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.run(
        [sys.executable, str(script), str(work), "tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_import_nfm_stays_light():
    """`import nfm` loads no stage: the API is imported on first use of nfm.Student and friends."""
    code = "import sys, nfm; print('nfm.pipeline.api' in sys.modules, 'torch' in sys.modules)"
    out = run_python(code)
    assert out == "False False"
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        nfm.Nope  # noqa: B018


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_student_eval_on_data_of_another_shape_is_one_line(tmp_path):
    """A 16x16 student asked to score the 8x8 digits: one `nfm: error:` line, not a matmul traceback."""
    from tests.conftest import run_nfm_inline

    torch.manual_seed(0)
    mc = StudentModelConfig(arch="mlp", in_channels=1, img_size=16, num_classes=10, width=16, depth=1)
    meta = {"kind": "student", "format_version": 1, "model": asdict(mc), "flow": asdict(FlowConfig())}
    nfm.Student(build_student(mc).eval(), {**meta, "data": asdict(DATA)}).save_pretrained(tmp_path / "s")
    p = run_nfm_inline("student", "eval", tmp_path / "s", "--n", "2")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "digits images are 1x8x8 but this student models 1x16x16 images: pass --data NAME" in p.stderr
