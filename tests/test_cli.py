"""End-to-end: the real `nfm` command on the tiny preset, in a temp dir."""

import argparse
import json
import time

import pytest
import torch
from PIL import Image

from nfm.core.io import load_tensors
from tests.conftest import run_nfm, run_nfm_inline

pytestmark = pytest.mark.slow


def nfm(*args, cwd, check=True):
    return run_nfm(*args, cwd=cwd, check=check)


def test_teacher_train_sample_eval_end_to_end(tmp_path):
    run = tmp_path / "run"
    p = nfm("teacher", "train", "--preset", "tiny", "--run-dir", str(run), cwd=tmp_path)
    assert "model.width" in p.stdout and "teacher export" in p.stdout  # the resolved config is printed
    for f in ("config.json", "log.txt", "metrics.jsonl", "export/model.safetensors", "export/config.json"):
        assert (run / f).is_file(), f
    assert json.loads((run / "config.json").read_text())["model"]["img_size"] == 8
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [5, 10, 15, 20] and all("bpd" in m for m in metrics)
    assert all(m["device"] == "cpu" and m["processes"] == 1 and m["threads"] >= 1 for m in metrics)  # img/s's basis
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
        (["--steps", "10"], "nfm teacher train: error: unrecognized arguments: --steps; settings are key=value"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    if args[0].startswith("--"):  # the real command (a subprocess) for these two; in-process for the rest
        p = nfm("teacher", "train", *args, "--run-dir", str(tmp_path / "r"), cwd=tmp_path, check=False)
    else:
        p = run_nfm_inline("teacher", "train", "--preset", "tiny", "--run-dir", tmp_path / "r", *args, cwd=tmp_path)
    assert p.returncode == 2
    assert message in p.stderr
    assert "Traceback" not in p.stderr


def test_missing_teacher_is_a_clear_error(tmp_path):
    p = nfm("teacher", "sample", str(tmp_path / "nothing"), cwd=tmp_path, check=False)
    assert p.returncode == 2 and "teacher not found" in p.stderr and "Traceback" not in p.stderr


def _commands(parser, prefix=()):
    """Every command path of the parser: (), ("teacher",), ("teacher", "train"), ..."""
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))


def test_every_command_has_help(capsys):
    """`--help` of every command and group, in process: usage, a description of each option, exit 0."""
    from nfm.pipeline.cli import build_parser, main

    paths = list(_commands(build_parser()))
    wanted = {("student", "sample"), ("student", "eval"), ("run",), ("teacher", "import"), ("pairs", "prior"),
              ("report", "merge")}  # fmt: skip
    assert wanted <= set(paths)
    assert len(paths) == 32  # nfm; teacher + 4; pairs + 7; student + 3; run; report + render, merge; kt + teacher +
    # train, pairs + build, student + train, eval, run; doctor
    for path in paths:
        with pytest.raises(SystemExit) as exit_:
            main([*path, "--help"])
        assert exit_.value.code == 0, path
        out = capsys.readouterr().out
        assert out.startswith(f"usage: nfm {' '.join(path)}".rstrip()), (path, out[:200])
        assert "--help" in out


def test_version_and_the_resolved_config_of_every_configurable_command(capsys, tmp_path):
    """`nfm --version`; --print-config on every command that takes a config: the resolved table (preset < file <
    overrides), exit 0, nothing trained or written."""
    import nfm
    from nfm.pipeline.cli import build_parser, main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"nfm {nfm.__version__}"
    configurable = [p for p in _commands(build_parser()) if "--print-config" in _help(p, capsys)]
    assert {("run",), ("teacher", "train"), ("student", "train"), ("pairs", "build"), ("kt", "run")} <= set(
        configurable
    ) and len(configurable) == 8
    runs = {("run",): "seeds=7", ("kt", "run"): "seeds=7"}  # the others: a training config of their own
    for path in [("run",), ("teacher", "train"), ("student", "train"), ("kt", "run"), ("kt", "student", "train")]:
        setting = runs.get(path, "train.steps=7")
        with pytest.raises(SystemExit) as exit_:
            main([*path, "--preset", "tiny", "--run-dir", str(tmp_path / "r"), "--print-config", setting])
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and "(resolved config)" in out, (path, out[-300:])
        key = setting.split("=")[0].split(".")[-1]
        assert any(line.split()[0].endswith(key) and line.split()[1] == "7" for line in out.splitlines()
                   if len(line.split()) == 2), (path, out)  # fmt: skip
    assert not (tmp_path / "r").exists()


def _help(path, capsys) -> str:
    from nfm.pipeline.cli import main

    with pytest.raises(SystemExit):
        main([*path, "--help"])
    return capsys.readouterr().out


def test_two_process_gloo_run_matches_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) and 1 process, same global batch: same losses, same weights."""
    common = ["teacher", "train", "--preset", "tiny", "train.steps=6", "train.log_every=1", "train.sample_every=0"]
    nfm(*common, "--run-dir", str(tmp_path / "one"), cwd=tmp_path)
    run_nfm(*common, "--run-dir", str(tmp_path / "two"), cwd=tmp_path, nproc=2)
    one = [json.loads(line) for line in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in two] == [1, 2, 3, 4, 5, 6]  # one writer, not two
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    wa = load_tensors(tmp_path / "one/export/model.safetensors")
    wb = load_tensors(tmp_path / "two/export/model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def _finish(procs, timeout: float = 900) -> list[str]:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    return outs


@pytest.mark.slow
def test_two_machines_build_the_pair_cache_and_train_the_student_as_one_does(tmp_path):
    """Two machines of one process each (torchrun --nnodes 2 over the loopback, gloo) sharing one cache root, as
    a network file system would: the cache equals one process's byte for byte; the student equals one machine's
    two-process run; a killed machine leaves the run resumable from its last checkpoint."""
    from tests.conftest import caches, make_teacher_export, nfm_on_machines

    teacher = make_teacher_export(tmp_path / "t")
    build = ["pairs", "build", "--teacher", teacher, "--views", "3", "pairs.shard_rows=50"]
    nfm(*build, "--cache-dir", tmp_path / "one", cwd=tmp_path)
    outs = _finish(nfm_on_machines(*build, "--cache-dir", tmp_path / "shared", cwd=tmp_path))
    (one,), (two,) = caches(tmp_path / "one"), caches(tmp_path / "shared")
    assert one.name == two.name and "pair cache built" in outs[0] and "pair cache built" not in outs[1]
    assert sorted(f.name for f in two.iterdir()) == sorted(f.name for f in one.iterdir())
    assert all((one / f.name).read_bytes() == f.read_bytes() for f in two.glob("*.safetensors"))

    train = ["student", "train", "--preset", "tiny", "--pairs", two.name, "--cache-dir", tmp_path / "shared",
             "train.steps=6", "train.sample_every=0"]  # fmt: skip
    run_nfm(*train, "--run-dir", tmp_path / "local2", nproc=2, cwd=tmp_path)
    _finish(nfm_on_machines(*train, "--run-dir", tmp_path / "nodes2", cwd=tmp_path))
    a = load_tensors(tmp_path / "local2" / "export" / "model.safetensors")
    b = load_tensors(tmp_path / "nodes2" / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # a machine dies mid-run (its launcher killed, as a power cut would): the other cannot go on alone and is
    # stopped too; the same launch on both resumes from the last checkpoint both wrote
    long = [*train[:-2], "train.steps=400", "train.ckpt_every=5", "train.sample_every=0", "--run-dir", tmp_path / "r"]
    procs = nfm_on_machines(*long, cwd=tmp_path)
    ckpts = tmp_path / "r" / "checkpoints"
    while procs[1].poll() is None and not list(ckpts.glob("step-*")):
        time.sleep(0.05)
    import psutil

    for p in procs[::-1]:  # the launcher and its worker: torchrun starts workers in sessions of their own
        for q in [*psutil.Process(p.pid).children(recursive=True), psutil.Process(p.pid)]:
            q.kill()
        p.wait()
    assert list(ckpts.glob("step-*")) and not (tmp_path / "r" / "export").exists()
    outs = _finish(nfm_on_machines(*long, cwd=tmp_path))
    assert "resumed from" in outs[0] and "(step 0)" not in outs[0] and (tmp_path / "r" / "export").is_dir()


def test_a_launcher_that_started_one_of_several_processes_is_named():
    """accelerate's simple launcher sets MASTER_ADDR for --num_processes N > 1 but starts one process."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    p = run_nfm_inline("teacher", "train", "--preset", "tiny", "train.nope=1", env=env)
    assert "nfm: warning: a launcher asked for several processes" in p.stderr and "torchrun" in p.stderr
    assert p.returncode == 2 and "unknown config key" in p.stderr  # the command itself goes on
    p = run_nfm_inline("teacher", "train", "--preset", "tiny", "train.nope=1", env={**env, "WORLD_SIZE": "2"})
    assert "warning" not in p.stderr  # torchrun / accelerate --multi_gpu: WORLD_SIZE is set


def test_help_loads_neither_torch_nor_the_stages():
    """`nfm ... --help` builds every parser (presets, sizes, couplings, solvers) from torch-free modules,
    so it answers at Python's start-up speed; the stages load when a command runs."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from nfm.pipeline.cli import build_parser\n"
        "build_parser()\n"
        "print(sorted(m for m in ('torch', 'numpy', 'scipy', 'accelerate', 'nfm.teacher.model') if m in sys.modules))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr
    for args in (["--help"], ["student", "train", "--help"], ["run", "--help"], ["kt", "run", "--help"]):
        p = subprocess.run([sys.executable, "-m", "nfm", *args], capture_output=True, text=True, timeout=600)
        assert p.returncode == 0 and "usage: nfm" in p.stdout, args
    from nfm.student.models import STUDENT_SIZES
    from nfm.teacher import TARFLOW_SIZES

    assert "SiT-XS/4" in STUDENT_SIZES and "mnist28-S" in TARFLOW_SIZES  # the old import paths still work
