"""Evidence over seeds: intervals, winners, per-seed configs, the NFM knobs, compute matching, the mixture."""

import math
from dataclasses import replace

import pytest
import torch

from nfm.core.config import build_config, config_hash, to_dict
from nfm.core.errors import NFMError
from nfm.core.seeding import BatchRandom
from nfm.pipeline.aggregate import aggregate_student, aggregate_teacher, interval, paired, spread, winner
from nfm.pipeline.presets import run_preset
from nfm.pipeline.results import ModelScores, RunResults
from nfm.pipeline.run import RunConfig, check_run, knob_config, seeded
from nfm.pipeline.run.budget import matched_steps
from nfm.pipeline.run.context import Costs
from nfm.student.couplings import PairCoupling, make_coupling


def test_interval_is_students_t_over_the_seeds():
    mean, hw = interval([1.0, 2.0, 3.0])
    # s = 1, t_{0.975, 2} = 4.302652729749464
    assert mean == 2.0 and hw == pytest.approx(4.302652729749464 / math.sqrt(3), rel=1e-12)
    mean, hw = interval([3.0, 5.0])
    assert mean == 4.0 and hw == pytest.approx(12.706204736174698 * math.sqrt(2) / math.sqrt(2), rel=1e-12)
    assert interval([7.5]) == (7.5, None)
    s = spread([1.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(math.sqrt(2)) and s["values"] == [1.0, 3.0]


def test_a_winner_only_where_the_intervals_separate():
    assert winner({"a": (1.0, 0.2), "b": (2.0, 0.3), "c": (3.0, 1.0)}) == "a"
    assert winner({"a": (1.0, 0.6), "b": (2.0, 0.5)}) is None  # 1.6 > 1.5: they overlap
    assert winner({"a": (1.0, None), "b": (9.0, None)}) is None  # one seed: no intervals, no winner
    assert winner({"a": (1.0, 0.1)}) is None


def _sweep(fid1, fid2, dopri_nfe, straight):
    rows = [
        {"solver": "euler", "steps": 1, "nfe": 1, "fid": fid1, "kid": fid1 / 10, "kid_std": 0.1},
        {"solver": "dopri5", "steps": None, "nfe": dopri_nfe, "fid": fid2, "kid": fid2 / 10, "kid_std": 0.3},
    ]
    return {"rows": rows, "straightness": straight, "memorisation": {"nn_dist_mean": straight}}


def test_aggregate_student_averages_rows_and_keeps_every_seed():
    agg = aggregate_student([_sweep(10.0, 5.0, 200, 0.1), _sweep(12.0, 6.0, 230, 0.3)])
    euler, dopri = agg.rows
    assert agg.seeds == 2 and euler.fid == 11.0 and euler.fid_seeds == [10.0, 12.0]
    assert euler.fid_ci == pytest.approx(12.706204736174698 * math.sqrt(2) / math.sqrt(2))
    assert dopri.nfe == 215 and dopri.nfe_seeds == [200, 230] and dopri.kid_std == pytest.approx(0.3)
    assert agg.straightness == pytest.approx(0.2) and agg.memorisation["nn_dist_mean"] == pytest.approx(0.2)
    assert ModelScores.from_json(agg.to_json()) == agg  # report.json round trip
    bad = _sweep(1.0, 1.0, 1, 0.0)
    bad["rows"][1]["solver"] = "heun"
    with pytest.raises(ValueError, match="disagree"):
        aggregate_student([_sweep(1.0, 1.0, 1, 0.0), bad])
    teacher = aggregate_teacher(
        [{"rows": [{"sampler": "decode", "fid": f, "kid": 0.0, "kid_std": 0.0}], "memorisation": {"m": f}}
         for f in (4.0, 6.0)]
    )  # fmt: skip
    assert teacher.rows[0].fid == 5.0 and teacher.rows[0].fid_ci > 0 and teacher.rows[0].sampler == "decode"


def _digits() -> RunConfig:
    return build_config(RunConfig, preset=run_preset("digits"))


def test_seed_k_shifts_every_training_seed_and_seed_0_is_the_run_itself():
    cfg = _digits()
    assert seeded(cfg, 0) is cfg
    assert config_hash(replace(cfg, seeds=3)) != config_hash(cfg)  # seeds is part of the run's config ...
    assert "seeds" not in to_dict(cfg)  # ... but at 1 it leaves earlier hashes as they were
    s2 = seeded(cfg, 2)
    assert s2.teacher.train.seed == cfg.teacher.train.seed + 2000
    assert s2.pairs.seed == cfg.pairs.seed + 2000 and s2.reflow.seed == cfg.reflow.seed + 2000
    assert s2.student.train.seed == cfg.student.train.seed + 2000
    assert s2.student.flow.sdot.seed == cfg.student.flow.sdot.seed + 2000
    assert s2.eval == cfg.eval  # every model is scored on the same noise
    assert s2.student.model == cfg.student.model and s2.teacher.model == cfg.teacher.model


def test_knobs_set_pairs_and_student_settings():
    cfg = _digits()
    k = knob_config(cfg, "eta=0")
    assert k.pairs.eta_scale == 0.0 and k.student == cfg.student
    k = knob_config(cfg, "views=4+mix=0.25+steps=3000")
    assert (k.pairs.views, k.student.flow.mix_independent, k.student.train.steps) == (4, 0.25, 3000)
    assert knob_config(cfg, "pairs.seed=5").pairs.seed == 5
    for bad in ("nope=1", "eta", "teacher.train.steps=5"):
        with pytest.raises(NFMError, match="knob"):
            knob_config(cfg, bad)
    with pytest.raises(NFMError, match="mix_independent"):
        knob_config(cfg, "mix=1.5")


def test_run_settings_that_cannot_work_are_refused_before_any_stage():
    cfg = _digits()
    check_run(replace(cfg, knobs=("eta=0",), compute_matched=("independent",)))
    with pytest.raises(NFMError, match="unknown config key"):
        check_run(replace(cfg, knobs=("views=1", "eta=0+pairs.bogus=1")))
    with pytest.raises(NFMError, match="add nfm to couplings"):
        check_run(replace(cfg, couplings=("independent",), knobs=("eta=0",)))
    with pytest.raises(NFMError, match="compute_matched=sb"):
        check_run(replace(cfg, compute_matched=("sb",)))  # not one of this run's couplings
    with pytest.raises(NFMError, match="compute_matched=nfm"):
        check_run(replace(cfg, compute_matched=("nfm",)))


def test_matched_steps_add_nfms_preparation_in_student_steps_and_are_kept(tmp_path):
    cfg = _digits()  # 1000 student steps
    flops = {"teacher_training": 3.0e12, "pairs": 0.05e12, "student_step": 2.0e9}
    costs = Costs(tmp_path, main=True)
    m = matched_steps(cfg, "independent", flops, {}, costs)
    # 3.05e12 / 2e9 = 1525 steps of preparation: 1000 + 1600 (rounded up to a multiple of 100)
    assert m["steps"] == 2600 and m["base_steps"] == 1000 and m["by"] == "flops"
    again = Costs(tmp_path, main=True)  # a rerun reads the decision back, whatever the counts say now
    assert matched_steps(cfg, "independent", {**flops, "pairs": 9e12}, {}, again)["steps"] == 2600
    with pytest.raises(NFMError, match="matched_by=flops"):
        matched_steps(replace(cfg, matched_by="seconds"), "minibatch-ot", None, {}, Costs(tmp_path / "x", True))


class _Cache:
    image_shape, num_classes, key, sigma_f, index = (1, 2, 2), 3, "k", 1.0, {}

    def __len__(self):
        return 8


def test_the_mixture_gives_an_exact_fraction_of_each_batch_fresh_noise_whatever_the_split():
    z, x, y = torch.randn(8, 1, 2, 2), torch.randn(8, 1, 2, 2), torch.arange(8) % 3
    mixed = PairCoupling(_Cache(), mix=0.25)
    zz, xx, yy = mixed.couple((z, x, y), BatchRandom(7, 3, 0, 8, 8))
    fresh = BatchRandom(7, 3, 0, 8, 8).randn(1, 2, 2)
    assert torch.equal(zz[:2], fresh[:2]) and torch.equal(zz[2:], z[2:])  # round(0.25 * 8) = 2 rows
    assert torch.equal(xx, x) and torch.equal(yy, y)  # the data and labels keep their places
    halves = [mixed.couple((z[i : i + 4], x[i : i + 4], y[i : i + 4]), BatchRandom(7, 3, i, 4, 8))[0] for i in (0, 4)]
    assert torch.equal(torch.cat(halves), zz)  # two processes / micro-batches give the one-process batch
    assert torch.equal(PairCoupling(_Cache()).couple((z, x, y), BatchRandom(7, 3, 0, 8, 8))[0], z)
    with pytest.raises(NFMError, match="paired couplings"):
        make_coupling("independent", data=object(), mix=0.5)


def _row(solver, nfe, fid, ci):
    return {"solver": solver, "steps": nfe, "nfe": nfe, "fid": fid, "fid_ci": ci, "kid": 0.0, "kid_std": 0.0}


def _typed(results: dict) -> RunResults:
    """A report.json of just the parts a table reads (the rest at made-up values), as RunResults."""
    return RunResults.from_json({"preset": "test", "n": 1, "seed": 0, "extractor": "x", "reference": 1, **results})


def test_the_headline_names_the_better_baseline_and_judges_by_intervals():
    from nfm.pipeline.report.tables import headline

    def student(*fids):
        return {"rows": [_row("euler", 1, fids[0], 0.5), _row("dopri5", 200, fids[1], 0.2)], "straightness": 0.1}

    results = {
        "students": {
            "nfm": student(10.0, 4.0),
            "independent": student(30.0, 4.1),
            "sd-ot": student(12.0, 3.0),
            "independent@matched": student(20.0, 4.5),
            "nfm[eta=0]": student(1.0, 1.0),  # a knob variant is not a baseline
        },
        "knobs": ["nfm[eta=0]"],
        "teacher": {"rows": [{"sampler": "decode", "fid": 5.0, "fid_ci": 0.1}]},
    }
    text = "\n".join(headline(_typed(results), [1]))
    assert "| Euler 1 | 10.00 ± 0.50 | 12.00 ± 0.50 (sd-ot) | 0.83 | **better** (intervals separate) |" in text
    assert "| dopri5 | 4.00 ± 0.20 | 3.00 ± 0.20 (sd-ot) | 1.33 | **worse** (intervals separate) |" in text
    assert (
        "| dopri5 | 4.00 ± 0.20 | 4.50 ± 0.20 (independent@matched) | 0.89 | **better** (intervals separate) |" in text
    )
    assert "against its teacher's best (decode: 5.00 ± 0.10): **better** (intervals separate)" in text
    results["students"]["nfm"]["rows"][0]["fid"] = 11.5  # 11.5 ± 0.5 against 12.0 ± 0.5: they overlap
    assert "| 0.96 | level (intervals overlap) |" in "\n".join(headline(_typed(results), [1]))


def test_a_student_against_its_own_teacher_is_paired_by_seed():
    """Seed k's student learnt from seed k's teacher: the per-seed differences can separate where the two
    unpaired intervals overlap (what the teachers' seed-to-seed spread shares with their students')."""
    from nfm.pipeline.report.tables import headline

    teacher_seeds, student_seeds = [4.74, 5.25, 4.96], [4.20, 4.50, 4.43]
    d, hw = paired(student_seeds, teacher_seeds)
    diffs = [-0.54, -0.75, -0.53]
    assert d == pytest.approx(sum(diffs) / 3, abs=1e-12)
    assert (d, hw) == pytest.approx(interval(diffs), abs=1e-12)
    with pytest.raises(ValueError, match="same seeds"):
        paired([1.0, 2.0], [1.0])

    def row(solver, nfe, seeds):
        mean, ci = interval(seeds)
        return {**_row(solver, nfe, mean, ci), "fid_seeds": seeds}

    results = {
        "seeds": 3,
        "students": {
            "nfm": {"seeds": 3, "rows": [row("euler", 1, [9.0, 9.5, 9.2]), row("dopri5", 200, student_seeds)]},
            "nfm[mix=0.5]": {"seeds": 1, "rows": [_row("dopri5", 200, 1.0, None)]},  # fewer seeds: not compared
        },
        "knobs": ["nfm[mix=0.5]"],
        "teacher": {
            "rows": [
                {
                    "sampler": "decode+denoise",
                    **dict(zip(("fid", "fid_ci"), interval(teacher_seeds))),
                    "fid_seeds": teacher_seeds,
                }
            ]
        },  # fmt: skip
    }
    text = "\n".join(headline(_typed(results), [1]))
    assert "(decode+denoise: 4.98 ± 0.64): level (intervals overlap); paired by seed, student − teacher = " in text
    assert f"= −{abs(d):.2f} ± {hw:.2f}: **below** its teacher." in text
    assert "mix=0.5" not in text
    results["students"]["nfm"]["rows"][1]["fid_seeds"] = [4.20, 5.50, 4.43]  # one seed above its teacher
    assert "paired by seed, student − teacher = −0.27 ± " in "\n".join(headline(_typed(results), [1]))
    assert ": level." in "\n".join(headline(_typed(results), [1]))


def test_one_step_nfm_against_reflow_and_sd_fm_is_paired_by_seed():
    """The one-step table's verdicts: NFM's one-step student at NFE 1 against reflow (flow matching and the
    same objective) and SD-FM (the same objective), by unpaired intervals and by the per-seed differences,
    which separate where the intervals overlap (seed-to-seed spread the couplings share)."""
    from nfm.pipeline.report.tables import one_step_table

    def student(seeds, solver="mean"):
        mean, ci = interval(seeds)
        return {"seeds": 3, "rows": [{**_row(solver, 1, mean, ci), "fid_seeds": seeds}]}

    nfm, reflow = [10.0, 14.0, 8.0], [9.0, 12.5, 7.2]  # NFM higher on every seed, by 1.0, 1.5, 0.8
    results = {
        "seeds": 3,
        "students": {
            "reflow": student([7.0, 8.0, 9.0], "euler"),
            "nfm/meanflow": student(nfm),
            "reflow/meanflow": student(reflow),
            "sd-ot/meanflow": student([11.0, 13.0, 9.0]),
        },
        "objectives": {
            "reflow": ["reflow", "fm"],
            "nfm/meanflow": ["nfm", "meanflow"],
            "reflow/meanflow": ["reflow", "meanflow"],
            "sd-ot/meanflow": ["sd-ot", "meanflow"],
        },
    }
    text = "\n".join(one_step_table(_typed(results)))
    d, hw = paired(nfm, reflow)
    assert d == pytest.approx(1.1, abs=1e-12) and d - hw > 0
    assert (
        "- One step, NFM (teacher pairs), MeanFlow against reflow of I-CFM (2-rectified), MeanFlow: "
        f"10.67 ± {interval(nfm)[1]:.2f} against 9.57 ± {interval(reflow)[1]:.2f}, level (intervals overlap); "
        f"paired by seed, NFM − rival = +1.10 ± {hw:.2f}: **higher**." in text
    )
    assert "MeanFlow against reflow of I-CFM (2-rectified), flow matching: " in text
    assert "MeanFlow against semidiscrete OT (SD-FM), MeanFlow: " in text and "−0.33 ± " in text
    results["students"]["sd-ot/meanflow"] = {"seeds": 1, "rows": [_row("mean", 1, 11.0, None)]}  # one seed: none
    text = "\n".join(one_step_table(_typed(results)))
    assert "against semidiscrete OT (SD-FM), MeanFlow: 10.67 ± " in text and "11.00, lower mean." in text


def test_where_a_student_was_timed_is_read_from_its_metrics(tmp_path):
    """trained_on: the device, processes and threads its img/s was measured with; both where a resume changed
    them; None for a run from before they were recorded."""
    from nfm.pipeline.run.budget import trained_on

    line = '{{"step": {}, "img_per_s": 100.0, "device": "cpu", "processes": 1, "threads": {}}}'
    (tmp_path / "metrics.jsonl").write_text("\n".join(line.format(s, t) for s, t in ((1, 1), (2, 1), (3, 2))))
    assert trained_on(tmp_path) == "cpu, 1 process, 1 thread then cpu, 1 process, 2 threads"
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "img_per_s": 100.0}')
    assert trained_on(tmp_path) is None and trained_on(tmp_path / "nowhere") is None


def test_one_step_cost_ratio_sets_only_students_trained_alike_against_each_other():
    """A one-step objective's cost is a ratio of two students' seconds per step; one reused from a run with other
    threads, or resumed under other conditions, is left out (and said to be), never mixed into the median."""
    from nfm.pipeline.report.tables import cost_ratio_line

    def c(sps, where):
        return {"seconds_per_step": sps, "trained_on": where}

    one, two = "cpu, 1 process, 1 thread", "cpu, 1 process, 2 threads"
    alike = [(c(0.30, two), c(0.10, two)), (c(0.40, two), c(0.20, two)), (c(0.90, two), c(0.30, two))]
    text = "\n".join(cost_ratio_line("meanflow", alike))
    assert "costs 3.00× a flow-matching step" in text and "median over 3 couplings" in text
    assert f"both students on {two}" in text and "left out" not in text
    mixed = [*alike, (c(0.10, two), c(0.40, one)), (c(0.2, f"{one} then {two}"), c(0.1, f"{one} then {two}"))]
    text = "\n".join(cost_ratio_line("meanflow", mixed))
    assert "costs 3.00×" in text and "median over 3 couplings" in text and "2 left out" in text
    text = "\n".join(cost_ratio_line("shortcut", mixed[3:]))
    assert "is not set against a flow-matching step" in text and "×" not in text
    legacy = [({"seconds_per_step": 0.2}, {"seconds_per_step": 0.1})]  # report.json from before it was recorded
    assert "costs 2.00×" in "\n".join(cost_ratio_line("shortcut", legacy)) and cost_ratio_line("meanflow", []) == []
