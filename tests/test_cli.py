"""End-to-end: the real `nfm` command on the tiny preset, in a temp dir."""

import json
import os
import subprocess
import sys

import pytest
import torch
from nfm.pipeline.core.io import load_tensors
from PIL import Image

pytestmark = pytest.mark.slow


def nfm(*args, cwd, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    if check and p.returncode != 0:
        raise AssertionError(f"nfm {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def test_teacher_train_sample_eval_end_to_end(tmp_path):
    run = tmp_path / "run"
    p = nfm("teacher", "train", "--preset", "tiny", "--run-dir", str(run), cwd=tmp_path)
    assert "model.width" in p.stdout and "teacher export" in p.stdout  # the resolved config is printed
    for f in ("config.json", "log.txt", "metrics.jsonl", "export/model.safetensors", "export/config.json"):
        assert (run / f).is_file(), f
    assert json.loads((run / "config.json").read_text())["model"]["img_size"] == 8
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [5, 10, 15, 20] and all("bpd" in m for m in metrics)
    pngs = sorted((run / "samples").glob("*.png"))
    assert [p.name for p in pngs] == ["step-0000010.png", "step-0000020.png"]
    assert Image.open(pngs[-1]).size[0] >= 8 * 10  # 10 columns of (upscaled) 8x8 samples
    assert sorted(c.name for c in (run / "checkpoints").iterdir()) == ["step-0000010", "step-0000020"]
    export = json.loads((run / "export/config.json").read_text())
    assert export["kind"] == "tarflow" and export["step"] == 20 and "test_bpd" in export

    again = nfm("teacher", "train", "--preset", "tiny", "--run-dir", str(run), cwd=tmp_path)
    assert "already complete" in again.stdout

    s = nfm("teacher", "sample", str(run), "--n", "12", "--out", str(tmp_path / "s"), cwd=tmp_path)
    assert "12 samples" in s.stdout
    t = load_tensors(tmp_path / "s.safetensors")
    assert t["images"].shape == (12, 1, 8, 8) and torch.isfinite(t["images"]).all()
    assert (tmp_path / "s.png").is_file()

    e = nfm("teacher", "eval", str(run), cwd=tmp_path)
    result = json.loads((run / "eval-test.json").read_text())
    assert result["images"] == 359 and result["bits_per_dim"] > 0 and "bits_per_dim" in e.stdout


def test_config_file_and_overrides_layer(tmp_path):
    (tmp_path / "c.toml").write_text("[train]\nsteps = 3\nlog_every = 1\n[model]\nwidth = 16\nhead_dim = 8\n")
    run = tmp_path / "r"
    nfm(
        "teacher",
        "train",
        "--preset",
        "tiny",
        "--config",
        str(tmp_path / "c.toml"),
        "--run-dir",
        str(run),
        "train.steps=2",
        "train.sample_every=0",
        cwd=tmp_path,
    )
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["steps"] == 2 and cfg["model"]["width"] == 16 and cfg["train"]["log_every"] == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["train.nope=1"], "unknown config key 'train.nope'"),
        (["train.steps=abc"], "cannot read 'abc' as int"),
        (["data.name=no-such-dataset-xyz"], "unknown dataset 'no-such-dataset-xyz'"),
        (["data.name=fashion-mnist", "data.root=/nonexistent"], "apt-get install dataset-fashion-mnist"),
        (["model.in_channels=3"], "disagree with the data"),
        (["--preset", "nope"], "unknown preset 'nope'"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    if args[0].startswith("--"):
        p = nfm("teacher", "train", *args, "--run-dir", str(tmp_path / "r"), cwd=tmp_path, check=False)
    else:
        p = nfm(
            "teacher", "train", "--preset", "tiny", "--run-dir", str(tmp_path / "r"), *args, cwd=tmp_path, check=False
        )
    assert p.returncode == 2
    assert message in p.stderr
    assert "Traceback" not in p.stderr


def test_missing_teacher_is_a_clear_error(tmp_path):
    p = nfm("teacher", "sample", str(tmp_path / "nothing"), cwd=tmp_path, check=False)
    assert p.returncode == 2 and "teacher not found" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize(
    "cmd",
    [
        [],
        ["teacher"],
        ["teacher", "train"],
        ["teacher", "sample"],
        ["teacher", "eval"],
        ["pairs"],
        ["pairs", "build"],
        ["pairs", "ls"],
        ["pairs", "verify"],
        ["pairs", "rm"],
    ],
)
def test_help(tmp_path, cmd):
    p = nfm(*cmd, "--help", cwd=tmp_path)
    assert "usage: nfm" in p.stdout


def test_two_process_gloo_run_matches_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) and 1 process, same global batch: same losses, same weights."""
    common = ["teacher", "train", "--preset", "tiny", "train.steps=6", "train.log_every=1", "train.sample_every=0"]
    nfm(*common, "--run-dir", str(tmp_path / "one"), cwd=tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pipeline.cli"]
    p = subprocess.run(
        cmd + common + ["--run-dir", str(tmp_path / "two")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    one = [json.loads(line) for line in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in two] == [1, 2, 3, 4, 5, 6]  # one writer, not two
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    wa = load_tensors(tmp_path / "one/export/model.safetensors")
    wb = load_tensors(tmp_path / "two/export/model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
