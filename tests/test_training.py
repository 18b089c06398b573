"""The shared training loop: schedule, batches, checkpoints, resume, bad data."""

import json
import os
import signal
from dataclasses import replace

import pytest
import torch

from nfm.core.batches import StepBatchSampler
from nfm.core.checkpoint import list_checkpoints
from nfm.core.config import build_config
from nfm.core.errors import NFMError
from nfm.core.io import load_tensors
from nfm.core.loop import Interrupted, TrainConfig, lr_at, train
from nfm.pipeline.presets import TEACHER_PRESETS
from nfm.teacher.train import TeacherRunConfig, run_teacher_training, teacher_loss


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_batches_cover_every_row_once_per_epoch_and_split_by_rank():
    n, batch, world = 50, 10, 2
    per_epoch = n // batch
    samplers = [StepBatchSampler(n, batch, seed=3, rank=r, world=world, start=0, end=per_epoch) for r in range(2)]
    rows = [r for s in samplers for b in s for r in b]
    assert sorted(rows) == list(range(n))
    # a sampler started mid-way yields exactly the tail of the uninterrupted stream
    full = list(StepBatchSampler(37, 8, 0, 0, 1, 0, 20))
    assert list(StepBatchSampler(37, 8, 0, 0, 1, 7, 20)) == full[7:]
    # batches that straddle epochs are still full
    assert all(len(b) == 8 for b in full)


def tiny_cfg(**train_kw) -> TeacherRunConfig:
    cfg = build_config(TeacherRunConfig, preset=TEACHER_PRESETS["tiny"])
    return replace(cfg, train=replace(cfg.train, **train_kw))


def _interrupt_after(calls: int):
    """A loss wrapper that sends SIGINT to this process during call number `calls`."""
    import nfm.teacher.train as tt

    original = tt.teacher_loss
    count = {"n": 0}

    def wrapped(eta, label_drop):
        fn = original(eta, label_drop)

        def loss_fn(model, batch, rng):
            count["n"] += 1
            if count["n"] == calls:
                os.kill(os.getpid(), signal.SIGINT)
            return fn(model, batch, rng)

        return loss_fn

    return wrapped


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, monkeypatch):
    cfg = tiny_cfg(steps=12, ckpt_every=5, sample_every=0, log_every=4)
    straight = run_teacher_training(cfg, tmp_path / "a")

    import nfm.teacher.train as tt

    monkeypatch.setattr(tt, "teacher_loss", _interrupt_after(7))
    with pytest.raises(Interrupted, match="interrupted at step 7"):
        run_teacher_training(cfg, tmp_path / "b")
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-0000005", "step-0000007"]
    monkeypatch.setattr(tt, "teacher_loss", teacher_loss)
    resumed = run_teacher_training(cfg, tmp_path / "b")

    a, b = load_tensors(straight / "model.safetensors"), load_tensors(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the raw (non-EMA) weights of the last checkpoint agree too
    ca = load_tensors(list_checkpoints(tmp_path / "a")[-1] / "model.safetensors")
    cb = load_tensors(list_checkpoints(tmp_path / "b")[-1] / "model.safetensors")
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    # metrics were not duplicated by the resume
    lines = (tmp_path / "b/metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == sorted(set(steps))


def test_resume_refuses_a_changed_config(tmp_path):
    run_teacher_training(tiny_cfg(steps=4, sample_every=0), tmp_path)
    with pytest.raises(NFMError, match=r"different config \(train.lr"):
        run_teacher_training(tiny_cfg(steps=4, sample_every=0, lr=0.5), tmp_path)


def test_completed_run_is_not_retrained_and_can_be_extended(tmp_path):
    run_teacher_training(tiny_cfg(steps=4, sample_every=0, ckpt_every=0), tmp_path)
    mtime = (tmp_path / "export/model.safetensors").stat().st_mtime_ns
    run_teacher_training(tiny_cfg(steps=4, sample_every=0, ckpt_every=0), tmp_path)
    assert (tmp_path / "export/model.safetensors").stat().st_mtime_ns == mtime
    run_teacher_training(tiny_cfg(steps=6, sample_every=0, ckpt_every=0), tmp_path)
    assert list_checkpoints(tmp_path)[-1].name == "step-0000006"


def test_unreadable_newest_checkpoint_falls_back_to_the_previous(tmp_path, monkeypatch):
    import nfm.teacher.train as tt

    cfg = tiny_cfg(steps=10, ckpt_every=3, keep_ckpts=3, sample_every=0)
    monkeypatch.setattr(tt, "teacher_loss", _interrupt_after(7))
    with pytest.raises(Interrupted):
        run_teacher_training(cfg, tmp_path)
    newest = list_checkpoints(tmp_path)[-1]
    assert newest.name == "step-0000007"
    (newest / "model.safetensors").write_bytes(b"\x00" * 10)  # corrupt it
    monkeypatch.setattr(tt, "teacher_loss", teacher_loss)
    run_teacher_training(cfg, tmp_path)
    log = (tmp_path / "log.txt").read_text()
    assert "skipping checkpoint" in log and "does not match its checksum" in log and "(step 6)" in log


class NaNData(torch.utils.data.Dataset):
    name = "nan-data"

    def __len__(self):
        return 16

    def __getitems__(self, rows):
        x = torch.zeros(len(rows), 1, 8, 8)
        for i, r in enumerate(rows):
            if r == 11:
                x[i, 0, 0, 0] = float("nan")
        return x, torch.zeros(len(rows), dtype=torch.long)


def test_nan_in_training_batch_names_the_rows(tmp_path, flow_factory):
    model = flow_factory(dtype=torch.float32, randomize=False)
    with pytest.raises(NFMError, match=r"nan-data\): rows \[11\] contain NaN"):
        train(
            run_dir=tmp_path,
            cfg=TrainConfig(steps=4, batch_size=16, sample_every=0),
            model=model,
            dataset=NaNData(),
            loss_fn=teacher_loss(0.1, 0.0),
            resolved_config={},
            export_fn=lambda *a: None,
        )


def test_batch_random_gives_each_row_the_same_noise_however_the_batch_is_split():
    from nfm.core.seeding import BatchRandom

    whole = BatchRandom(7, 3, 0, 8, 8)
    a, b = whole.randn(2, 2), whole.rand()
    parts = [BatchRandom(7, 3, off, 2, 8) for off in (0, 2, 4, 6)]
    pa = torch.cat([p.randn(2, 2) for p in parts])
    pb = torch.cat([p.rand() for p in parts])
    assert torch.equal(a, pa) and torch.equal(b, pb)
    assert not torch.equal(BatchRandom(7, 4, 0, 8, 8).randn(2, 2), a)  # another step, other noise


def _adamw_after_two_steps(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _same_optimizer_state(a: dict, b: dict) -> bool:
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    for pid, st in a["state"].items():
        for k, v in st.items():
            w = b["state"][pid][k]
            if not (torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w):
                return False
    return True


def test_checkpoint_restores_the_optimizer_bit_for_bit_and_reads_the_previous_format(tmp_path):
    """optimizer.pt (torch's format, read with weights_only=True) restores AdamW exactly; a checkpoint of the
    previous format (optimizer tensors in optimizer.safetensors, the rest in state.json) still loads."""
    from nfm.core.checkpoint import EMA, load_checkpoint, save_checkpoint
    from nfm.core.io import save_tensors, write_json

    model, opt = _adamw_after_two_steps()
    path = save_checkpoint(tmp_path, 2, model, EMA(model, 0.9), opt, keep=2)
    fresh, fresh_opt = _adamw_after_two_steps(seed=1)
    assert not _same_optimizer_state(opt.state_dict(), fresh_opt.state_dict())
    assert load_checkpoint(path, fresh, EMA(fresh, 0.9), fresh_opt) == 2
    assert _same_optimizer_state(opt.state_dict(), fresh_opt.state_dict())

    sd = opt.state_dict()  # the previous format, written as the previous version did
    tensors = {f"state.{p}.{k}": v for p, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    extra = {f"{p}.{k}": v for p, st in sd["state"].items() for k, v in st.items() if not torch.is_tensor(v)}
    (path / "optimizer.pt").unlink()
    save_tensors(path / "optimizer.safetensors", tensors)
    write_json(path / "state.json", {"step": 2, "optimizer": {"param_groups": sd["param_groups"], "extra": extra}})
    old, old_opt = _adamw_after_two_steps(seed=2)
    assert load_checkpoint(path, old, EMA(old, 0.9), old_opt) == 2
    assert _same_optimizer_state(opt.state_dict(), old_opt.state_dict())


def test_the_ema_update_is_the_per_tensor_lerp_exactly():
    """EMA.update takes every tensor in one multi-tensor lerp: the same numbers as shadow + (1 - d)(p - shadow)
    tensor by tensor, with the warm-up d = min(decay, (1 + s) / (10 + s)), bit for bit."""
    from nfm.core.checkpoint import EMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))
    ema = EMA(model, 0.99)
    expected = {k: v.clone() for k, v in ema.shadow.items()}
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model, step)
        d = min(0.99, (1 + step) / (10 + step))
        for k, p in model.named_parameters():
            expected[k].lerp_(p.detach().float(), 1.0 - d)
    for k in expected:
        assert ema.shadow[k].dtype == torch.float32 and torch.equal(ema.shadow[k], expected[k]), k
    assert not torch.equal(ema.shadow["0.weight"], model[0].weight)  # a moving average, not a copy


def test_a_compiled_training_step_trains_the_same_weights_as_eager(tmp_path, monkeypatch):
    """train.compile=true runs the step's model under torch.compile, traced into graphs (forward and backward);
    the weights agree with eager to a tolerance (a compiler may reorder float arithmetic); the EMA export and the
    checkpoints keep their plain names; auto is off on CPU. The graphs run through torch's aot_eager backend
    here: inductor's C++ compile takes ~40 s even for the tiny teacher (benchmarks/mltarflow_bench.py --compile
    runs it)."""
    from safetensors.torch import load_file

    import nfm.core.loop as loop
    from nfm.core.loop import use_compile

    monkeypatch.setattr(loop, "COMPILE_OPTIONS", {"backend": "aot_eager"})
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    kw = dict(steps=3, sample_every=0, ckpt_every=0, log_every=1)
    eager = run_teacher_training(tiny_cfg(**kw, compile="false"), tmp_path / "eager")
    compiled = run_teacher_training(tiny_cfg(**kw, compile="true"), tmp_path / "compiled")
    assert "torch.compile on (train.compile=true)" in (tmp_path / "compiled" / "log.txt").read_text()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the step really ran compiled
    we, wc = load_file(eager / "model.safetensors"), load_file(compiled / "model.safetensors")
    assert we.keys() == wc.keys()
    for k in we:
        torch.testing.assert_close(wc[k], we[k], rtol=1e-4, atol=1e-5)
    ckpt = load_file(next((tmp_path / "compiled" / "checkpoints").iterdir()) / "model.safetensors")
    assert ckpt.keys() == we.keys()  # no _orig_mod. prefixes

    cfg = tiny_cfg(compile="auto").train
    assert not use_compile(cfg, torch.device("cpu"), 10**6)[0]
    assert use_compile(cfg, torch.device("cuda"), 10**6)[0] and not use_compile(cfg, torch.device("cuda"), 100)[0]
    assert use_compile(tiny_cfg(compile="true").train, torch.device("cpu"), 1)[0]
    # a JSON / TOML boolean reads as the choice of the same name; anything else is refused
    preset = TEACHER_PRESETS["tiny"]
    as_bool = build_config(TeacherRunConfig, preset={**preset, "train": {**preset["train"], "compile": False}})
    assert as_bool.train.compile == "false"
    with pytest.raises(NFMError, match="'train.compile': 'yes' is not one of auto, true, false"):
        build_config(TeacherRunConfig, preset=preset, overrides=["train.compile=yes"])


def _loss_nan_from(call: int):
    """teacher_loss whose loss turns NaN from call number `call` (1-based) on."""
    import nfm.teacher.train as tt

    original, count = tt.teacher_loss, {"n": 0}

    def wrapped(eta, label_drop):
        fn = original(eta, label_drop)

        def loss_fn(model, batch, rng):
            count["n"] += 1
            loss, logs = fn(model, batch, rng)
            return (loss * float("nan") if count["n"] >= call else loss), logs

        return loss_fn

    return wrapped


def test_a_diverged_step_is_named_and_no_checkpoint_or_export_carries_it(tmp_path, monkeypatch):
    import nfm.teacher.train as tt

    # the loss is read once per log window (here 100 steps), yet the error names the step and stops before
    # the checkpoint at step 4 could save the NaN weights of step 3
    monkeypatch.setattr(tt, "teacher_loss", _loss_nan_from(4))
    cfg = tiny_cfg(steps=10, ckpt_every=2, sample_every=0, log_every=100)
    with pytest.raises(NFMError, match=r"training diverged at step 3 \(loss nan"):
        run_teacher_training(cfg, tmp_path / "run")
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000002"]
    assert not (tmp_path / "run" / "export").exists()


def test_the_training_step_reads_nothing_back_from_the_device_between_log_lines(tmp_path, monkeypatch):
    """Every tensor -> Python number made by the project's code (a host sync on a GPU) is counted: the count
    depends on the log windows, not on the steps in them. The data pipeline (batches.py) is left out: it reads
    and checks host tensors before they go to the device."""
    import sys
    from pathlib import Path

    import nfm.pipeline
    import nfm.student
    import nfm.teacher

    roots = tuple(str(Path(m.__file__).resolve().parent) for m in (nfm.pipeline, nfm.student, nfm.teacher))
    tests = str(Path(__file__).resolve().parent)
    counts = {"n": 0}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def method(self, *a, **k):
            f = sys._getframe(1).f_code.co_filename
            if f.startswith(roots) and not f.startswith(tests) and not f.endswith("batches.py"):
                counts["n"] += 1
            return original(self, *a, **k)

        return method

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__format__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    seen = []
    for steps in (4, 12):
        counts["n"] = 0
        cfg = tiny_cfg(steps=steps, ckpt_every=0, sample_every=0, log_every=steps)
        run_teacher_training(cfg, tmp_path / f"run{steps}")
        seen.append(counts["n"])
    assert seen[0] == seen[1], f"host reads grow with the steps: {seen[0]} for 4 steps, {seen[1]} for 12"
