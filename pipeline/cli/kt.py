"""`nfm kt teacher train | pairs build | student train | eval | run`: FM-KT, knowledge transfer by flow matching."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from nfm.core.errors import NFMError
from nfm.pipeline.cli import options


def _preset(name: str, section: str) -> dict:
    from nfm.pipeline.presets import kt_preset

    return kt_preset(name).get(section, {})


def cmd_teacher_train(args) -> int:
    """train (or resume) a classifier teacher (a small ResNet) for knowledge transfer"""
    from nfm.teacher.classifier import ClassifierRunConfig, run_classifier_training

    cfg = options.configure(args, ClassifierRunConfig, _preset(args.preset, "teacher"))
    run_dir = Path(args.run_dir or f"runs/kt-teacher-{args.preset}")
    t0 = time.perf_counter()
    return options.finished("classifier", t0, run_dir, run_classifier_training(cfg, run_dir))


def cmd_pairs_build(args) -> int:
    """cache a classifier's logits for every training image and augmented view

    The views are pure functions of (seed, image, view); the cache is the pair-cache format (noise column = the
    teacher's logits, data = the view), keyed by the teacher's and the data's fingerprints, resumable.
    """
    from nfm.core.config import from_dict
    from nfm.core.data import DataConfig, load_data
    from nfm.pairs.kt import KTPairConfig, build_kt_pairs
    from nfm.teacher.classifier import load_classifier

    overrides = [o.removeprefix("pairs.") for o in args.overrides]
    overrides += [f"{k}={v}" for k, v in (("views", args.views), ("seed", args.seed)) if v is not None]
    cfg = options.configure(args, KTPairConfig, _preset(args.preset, "pairs"), overrides)
    model, meta = load_classifier(args.teacher, options.device(args))
    data = load_data(from_dict(DataConfig, meta["data"]), "train")
    res = build_kt_pairs(model, data, cfg, options.cache_root(args), teacher_info={"source": str(args.teacher)})
    print(f"{'cache hit' if res.hit else 'built'}: {res.key} ({res.total_rows} rows) at {res.path}")
    return 0


def cmd_student_train(args) -> int:
    """train (or resume) a small student on a logit cache: alone, with vanilla KD, with FM-KT, or with OFM-KT

    OFM-KT, the online variant, needs no teacher: each of its K steps learns from the steps' own detached
    ensemble. The authors smooth its labels: kt.label_smoothing=0.1. Without --pairs, `none` and `ofm-kt`
    train on the preset's data and views (those a logit cache of the preset holds), drawn on the fly.
    """
    from nfm.core.config import build_config, from_dict
    from nfm.core.data import DataConfig, load_data
    from nfm.pairs.kt import KTPairConfig
    from nfm.pairs.lookup import find_cache
    from nfm.pairs.reader import PairCache
    from nfm.student.kt import KTStudentRunConfig, KTViews, run_kt_student_training

    flags = {"method": args.method, "schedule": args.schedule, "steps": args.steps, "kd_loss": args.kd_loss}
    overrides = list(args.overrides) + [f"kt.{k}={v}" for k, v in flags.items() if v is not None]
    preset = _preset(args.preset, "student")
    cfg = options.configure(args, KTStudentRunConfig, preset, overrides)
    if args.pairs:
        pairs = PairCache(
            find_cache(args.pairs, options.cache_root(args)), kinds=("kt",), reader="nfm kt student train"
        )
        data_cfg = pairs.index.get("data", {}).get("config")
    else:  # none and ofm-kt need no teacher; the others are refused by the training, naming --pairs
        data_cfg = _preset(args.preset, "teacher").get("data", {})
        views = build_config(KTPairConfig, preset=_preset(args.preset, "pairs"))
        train = load_data(from_dict(DataConfig, data_cfg), "train")
        pairs = KTViews(train, views.views, views.seed, views.augment)
    held_out = load_data(from_dict(DataConfig, data_cfg), "test") if data_cfg else None
    run_dir = Path(args.run_dir or f"runs/kt-student-{cfg.kt.method}")
    t0 = time.perf_counter()
    return options.finished("KT student", t0, run_dir, run_kt_student_training(cfg, run_dir, pairs, held_out))


def cmd_eval(args) -> int:
    """held-out accuracy of a KT student (at K = 1, 2, 4, 8 sampler steps) or of a classifier teacher"""
    from nfm.core.config import from_dict
    from nfm.core.data import DataConfig, load_data
    from nfm.core.io import read_json
    from nfm.student.kt import accuracy_at, load_kt_student
    from nfm.teacher.classifier import accuracy, load_classifier

    p = Path(args.run)
    export = p / "export" if (p / "export" / "config.json").is_file() else p
    meta = read_json(export / "config.json", "model config")
    steps = [int(s) for s in args.steps.split(",")]
    if meta.get("kind") == "classifier":
        model, meta = load_classifier(export, options.device(args))
        data = load_data(from_dict(DataConfig, meta["data"]), args.split)
        acc = accuracy(model, data, device=model.fc.weight.device)
        result = {"model": "teacher", "split": args.split, "accuracy": acc}
    elif meta.get("kind") == "kt-student":
        model, meta = load_kt_student(export, options.device(args))
        if not meta.get("data"):
            raise NFMError(f"{export} does not record its data; it was trained on a cache built before this record")
        data = load_data(from_dict(DataConfig, meta["data"]), args.split)
        result = {"model": f"student ({meta['kt']['method']})", "split": args.split,
                  "accuracy_at_steps": {str(k): a for k, a in accuracy_at(model, data, steps).items()}}  # fmt: skip
    else:
        raise NFMError(f"{export} is neither a classifier teacher nor a KT student (kind {meta.get('kind')!r})")
    print(result)
    return 0


def cmd_run(args) -> int:
    """everything: classifier teacher -> logit cache -> students (none, kd, fm-kt, ofm-kt...) -> accuracy -> report

    Finished stages are reused, interrupted ones resume: rerun the same command. `--seeds 3` re-runs teacher,
    cache and students per seed and reports 95 % intervals. Rows are METHOD[+KEY=VALUE...]: e.g.
    methods=none,kd,fm-kt,fm-kt+schedule=vp,fm-kt+kd_loss=dist,ofm-kt+label_smoothing=0.1
    """
    from nfm.pipeline.kt import KTRunConfig, run_kt
    from nfm.pipeline.presets import kt_preset

    overrides = list(args.overrides) + ([f"seeds={args.seeds}"] if args.seeds is not None else [])
    cfg = options.configure(args, KTRunConfig, kt_preset(args.preset), overrides)
    run_dir = Path(args.run_dir or f"runs/kt-{args.preset}")
    t0 = time.perf_counter()
    report = run_kt(cfg, run_dir, args.preset, options.cache_root(args))
    print(f"done in {time.perf_counter() - t0:.0f}s. report: {report}")
    return 0


def register(stages: argparse._SubParsersAction) -> None:
    from nfm.pipeline.presets import KT_PRESETS

    kt = options.add_group(stages, "kt", "knowledge transfer by flow matching (FM-KT): classifier -> logits -> student")

    teacher = options.add_group(kt, "teacher", "the classifier teacher")
    p = options.add_command(teacher, "train", cmd_teacher_train)
    options.add_preset(p, KT_PRESETS, default="fashion-mnist")
    options.add_config_layers(p, "train.steps=500 model.width=16", "run directory (default: runs/kt-teacher-PRESET)")

    pairs = options.add_group(kt, "pairs", "the teacher's logit cache")
    p = options.add_command(pairs, "build", cmd_pairs_build)
    p.add_argument("--teacher", required=True, metavar="RUN", help="a classifier run directory or its export/")
    p.add_argument("--views", type=int, help="views per image (view 0: the image itself; default: the preset's)")
    p.add_argument("--seed", type=int, help="seed of the views' shifts and flips (default 0)")
    options.add_preset(p, KT_PRESETS, default="fashion-mnist")
    options.add_cache_dir(p)
    options.add_device(p)
    options.add_config_layers(p, "augment.shift=1 batch_size=256")

    student = options.add_group(kt, "student", "the student trained on the logit cache")
    p = options.add_command(student, "train", cmd_student_train)
    p.add_argument("--pairs", metavar="KEY",
                   help="logit cache: key, key prefix or directory (none and ofm-kt: optional)")  # fmt: skip
    p.add_argument("--method", choices=["none", "kd", "fm-kt", "ofm-kt"],
                   help="none, kd, fm-kt or ofm-kt (online: no teacher) (default fm-kt)")  # fmt: skip
    p.add_argument("--schedule", choices=["rf", "vp", "ve"], help="FM-KT path (default rf, rectified flow)")
    p.add_argument("--steps", type=int, help="FM-KT serial steps K in training (default 4)")
    p.add_argument("--kd-loss", dest="kd_loss", choices=["kl", "dist"], help="KD metric (default kl)")
    options.add_preset(p, KT_PRESETS, default="fashion-mnist")
    options.add_cache_dir(p)
    options.add_config_layers(p, "train.steps=500 model.width=8", "run directory (default: runs/kt-student-METHOD)")

    p = options.add_command(kt, "eval", cmd_eval)
    p.add_argument("run", help="a KT student or classifier run directory, or its export/")
    p.add_argument("--steps", default="1,2,4,8", help="FM-KT sampler steps K, comma-separated (default 1,2,4,8)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="data split (default test)")
    options.add_device(p)

    p = options.add_command(kt, "run", cmd_run)
    options.add_preset(p, KT_PRESETS, default="fashion-mnist")
    p.add_argument("--seeds", type=int, metavar="N", help="training seeds (default: the preset's, 3)")
    options.add_cache_dir(p)
    options.add_config_layers(p, "methods=none,kd,fm-kt,fm-kt+schedule=vp", "run directory (default: runs/kt-P)")
