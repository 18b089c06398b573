"""The house: one namespace, the import contract, and the defects of the 2026-11 review (each test here
failed before its fix)."""

from __future__ import annotations

import ast
import logging
import re
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from nfm.core.errors import NFMError
from tests.conftest import caches, run_nfm
from tests.layers import REPO, STAGES, lint_imports

# ----------------------------------------------------------------------------- namespace and layers


def test_the_import_contract_is_kept():
    p = lint_imports()
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Contracts: 2 kept, 0 broken." in p.stdout


@pytest.mark.parametrize(
    "module,line,broken",
    [
        ("teacher/export.py", "import nfm.pipeline.run", "nfm.teacher.export -> nfm.pipeline.run"),  # stage -> top
        ("pairs/build.py", "import nfm.teacher.model", "nfm.pairs.build -> nfm.teacher.model"),  # past the protocol
        ("core/io.py", "import nfm.student.paths", "nfm.core.io -> nfm.student.paths"),  # up
        ("student/paths.py", "import core.errors", "nfm.student.paths -> core"),  # bare name
        ("core/loop.py", "import nfm.pipeline.run", "nfm.core.loop -> nfm.pipeline.run"),  # foundation -> top
    ],
)
def test_a_wrong_import_breaks_the_contract(module, line, broken):
    def edit(nfm_dir: Path) -> None:
        f = nfm_dir / module
        f.write_text(f.read_text() + f"\n{line}  # noqa\n")

    p = lint_imports(edit)
    assert p.returncode != 0 and "BROKEN" in p.stdout
    assert broken in p.stdout, p.stdout[-2000:]


def test_the_stage_folders_import_only_as_nfm(tmp_path):
    """From outside the repository the bare names do not exist; everything is beneath `nfm`."""
    code = (
        "import importlib.util as u, nfm.core.loop as l, nfm.teacher.model as m;"
        "print([u.find_spec(n) is None for n in ('core', 'pipeline', 'teacher', 'student', 'pairs')], l.__name__)"
    )
    import subprocess

    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.stdout.split() == ["[True,", "True,", "True,", "True,", "True]", "nfm.core.loop"], p.stderr


def test_a_wheel_holds_only_the_nfm_package(tmp_path):
    import shutil
    import subprocess

    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("nfm", *STAGES):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "absent from the `packages` configuration" not in p.stdout + p.stderr  # every folder it ships is declared
    (wheel,) = tmp_path.glob("nfm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"nfm", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for stage in STAGES:
        assert f"nfm/{stage}/__init__.py" in names
    assert "nfm/core/loop.py" in names and "nfm/pipeline/weights/featurenet-digits.safetensors" in names
    assert not any(n.startswith("nfm/tests") or n.startswith("nfm/benchmarks") for n in names)


# ----------------------------------------------------------------------------- the documents' links

LINK = re.compile(r"\]\(([^)\s]+)\)")  # the target of a markdown link or image


def broken_links(files: list[Path]) -> list[str]:
    """Every relative link or image in `files` whose target does not exist (web addresses are not checked)."""
    out = []
    for md in files:
        for target in LINK.findall(md.read_text()):
            path = target.split("#")[0]
            if path and not re.match(r"[a-z]+:", path) and not (md.parent / path).exists():
                out.append(f"{md.name}: {target}")
    return out


def test_every_relative_link_of_the_readme_and_the_results_resolves(tmp_path):
    files = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    assert broken_links(files) == []
    (tmp_path / "here.png").write_bytes(b"")
    (tmp_path / "r.md").write_text("![a](here.png) [b](https://x.org/y) [c](#top) ![d](gone.png) [e](sub/f.md#x)")
    assert [s.split(": ")[1] for s in broken_links([tmp_path / "r.md"])] == ["gone.png", "sub/f.md#x"]


# ----------------------------------------------------------------------------- defect 2: the Python floor

# stdlib modules newer than Python 3.10, with the release that added them
NEWER_STDLIB = {"tomllib": (3, 11)}


def test_requires_python_admits_no_release_without_a_module_we_import():
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    floor = tuple(int(x) for x in re.fullmatch(r">=\s*(\d+)\.(\d+)", meta["requires-python"]).groups())
    for stage in ("nfm", *STAGES):
        for f in (REPO / stage).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                for name in names:
                    need = NEWER_STDLIB.get(name.split(".")[0])
                    assert need is None or floor >= need, f"{f} imports {name} (Python {need}) below {floor}"


# ----------------------------------------------------------------------------- defect 3: spawn workers


def test_data_loader_workers_started_by_spawn(tmp_path):
    """num_workers=2 under the spawn start method (macOS, Windows, Python 3.14): the collate function and
    the data set must pickle."""
    from nfm.core.batches import dataset_batches
    from nfm.core.data import DataConfig, load_data

    data = load_data(DataConfig(name="digits"), "train")
    inline = list(dataset_batches(data, seed=3, end=4)(0, 1, 16, 0))
    spawned = list(dataset_batches(data, seed=3, end=4, num_workers=2, multiprocessing_context="spawn")(0, 1, 16, 0))
    assert len(spawned) == 4
    for a, b in zip(inline, spawned):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- defect 4: one forward per NFE


class _CountingField(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(
            torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        )
        self.calls = 0

    def forward(self, x, t, y):
        self.calls += 1
        return torch.tanh(x.flatten(1) @ self.w * 0.3).view_as(x) * (1 + t.view(-1, 1, 1, 1))


@pytest.mark.parametrize("hutchinson", [0, 3])
def test_likelihood_runs_the_network_once_per_function_evaluation(hutchinson):
    from nfm.student.likelihood import log_likelihood

    model = _CountingField()
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, stats = log_likelihood(model, x, solver="rk4", steps=3, hutchinson=hutchinson)
    assert stats["nfe"] == 12 and model.calls == stats["nfe"]


# ----------------------------------------------------------------------------- defect 5: the total of dropped pairs

NAN_FLOW = """
import torch
from userflow import ElementwiseFlow

class NaNForThrees(ElementwiseFlow):
    def encode(self, x, y):
        z = super().encode(x, y)
        return torch.where((y == 3).view(-1, 1, 1, 1), torch.full_like(z, float("nan")), z)

def make():
    return NaNForThrees()
"""


@pytest.mark.slow
def test_two_process_build_counts_non_finite_pairs_over_all_processes(tmp_path, user_flow_dir):
    """pairs.max_nonfinite bounds the total: two processes each under the limit, together over it, refuse."""
    from nfm.core.data import DataConfig, load_data
    from nfm.pairs.format import read_index

    (user_flow_dir / "nanflow.py").write_text(NAN_FLOW)
    train = load_data(DataConfig(name="digits"), "train")
    threes = int((train.labels == 3).sum())
    allowed = (threes - 0.5) / len(train)  # int(allowed * rows) = threes - 1
    args = ["pairs", "build", "--teacher", "python:nanflow:make", "--data", "digits", "--views", "1"]
    args += ["--cache-dir", tmp_path / "c"]
    args += ["pairs.shard_rows=100", f"pairs.max_nonfinite={allowed!r}"]
    env = {"PYTHONPATH": str(user_flow_dir)}
    two = run_nfm(*args, env=env, nproc=2, check=False)
    assert two.returncode != 0 and f"{threes} pairs encode to NaN/Inf (allowed: {threes - 1}" in two.stderr
    (cache,) = caches(tmp_path / "c")
    assert not read_index(cache)["complete"]
    again = run_nfm(*args, env=env, check=False)  # a rerun in one process refuses the same cache
    assert again.returncode == 2 and f"{threes} pairs encode to NaN/Inf" in again.stderr


# ----------------------------------------------------------------------------- defect 6: log handlers closed


def test_setup_logger_closes_the_handlers_it_replaces(tmp_path):
    from nfm.core.rundir import setup_logger

    first = setup_logger(tmp_path, name="nfm.test")
    (fh,) = [h for h in first.handlers if isinstance(h, logging.FileHandler)]
    first.info("one")
    assert fh.stream is not None and not fh.stream.closed
    second = setup_logger(tmp_path, name="nfm.test")
    assert second is first and fh not in second.handlers
    assert fh.stream is None  # FileHandler.close() drops its stream
    second.info("two")
    assert (tmp_path / "log.txt").read_text().count("\n") == 2


# ----------------------------------------------------------------------------- defect 1: guidance on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["sequential", "jacobi"])
def test_annealed_guidance_decodes_on_cuda(flow_factory, method):
    from nfm.teacher.model import Guidance

    model = flow_factory(num_classes=5, dtype=torch.float32)
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    g = Guidance(1.5, annealed=True, attn_temp=0.7)
    cpu = model.decode(z, y, guidance=g, method=method)
    gpu = model.cuda().decode(z.cuda(), y.cuda(), guidance=g, method=method)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- the one sampling recipe


def test_the_teacher_preview_samples_through_the_prior(flow_factory, tmp_path):
    """The teacher's preview grid applies its prior std, as `nfm teacher sample` and evaluation do."""
    from nfm.teacher.train import TeacherSampleConfig, sample_grid

    model = flow_factory(num_classes=0, dtype=torch.float32)
    cfg = TeacherSampleConfig(n=6, denoise=False, seed=5)
    plain = sample_grid(model, cfg, tmp_path / "a.png")
    with torch.no_grad():
        model.var.fill_(4.0)  # prior std 2
    wide = sample_grid(model, cfg, tmp_path / "b.png")
    eps = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(model.encode(wide), 2 * eps)
    torch.testing.assert_close(model.encode(plain), eps)
    assert (tmp_path / "a.png").is_file() and (tmp_path / "b.png").is_file()


def test_unknown_choices_are_refused_where_the_config_is_loaded():
    from nfm.core.config import build_config
    from nfm.pipeline.run import RunConfig

    cases = {
        "student.flow.coupling=sinkhorn": "'student.flow.coupling': 'sinkhorn' is not one of nfm, independent",
        "student.flow.path=cosine": "'student.flow.path': 'cosine' is not one of linear, vp, ve",
        "pairs.dtype=int8": "'pairs.dtype': 'int8' is not one of float16, float32",
        "teacher.model.scale=tanh": "'teacher.model.scale': 'tanh' is not one of exp, softplus",
        "teacher.train.mixed_precision=fp16": "'teacher.train.mixed_precision': 'fp16' is not one of no, bf16",
        "couplings=nfm,rectified": "'couplings': 'rectified' is not one of nfm, independent, minibatch-ot",
        "eval.higher_solver=rk45": "'eval.higher_solver': 'rk45' is not one of euler, midpoint, heun, rk4, dopri5",
    }
    for override, message in cases.items():
        with pytest.raises(NFMError, match=re.escape(message)):
            build_config(RunConfig, overrides=[override])


# ----------------------------------------------------------------------------- the README's map of the house


def _leading_names(segment: str) -> set[str]:
    """The module / folder names a segment of the map starts with: "models.py, sampling.py   ...",
    "featurenet.py + weights/: ..."."""
    out = set()
    for word in segment.split():
        name = word.rstrip(",:")
        if word == "+":
            continue
        if not re.fullmatch(r"\w+(\.py|/)", name):
            break
        out.add(name)
    return out


def _readme_map() -> dict[str, set[str]]:
    """{folder: the modules and subfolders the README's map names in it} (the code block after 'The house'):
    a folder starts at column 0; an indented line names modules in its first column and at the start of each
    later ";  "-separated segment."""
    block = (REPO / "README.md").read_text().split("### The house", 1)[1].split("```", 2)[1]
    out: dict[str, set[str]] = {}
    folder = None
    for line in block.splitlines():
        if line[:1].strip() and line.split()[0].endswith("/"):
            folder = line.split()[0].rstrip("/")
            out[folder] = set()
        elif folder and line.startswith("  "):
            first, *rest = line.strip().split(";  ")
            out[folder] |= _leading_names(re.split(r"\s{2,}", first)[0])
            for segment in rest:
                out[folder] |= _leading_names(segment)
    return out


def test_the_readme_map_names_every_module_and_nothing_else():
    """Every module and subpackage of each folder is on the map, and the map names nothing that is gone."""
    named = _readme_map()
    assert set(named) == set(STAGES), sorted(named)
    for folder in STAGES:
        tree = {p.name for p in (REPO / folder).glob("*.py") if p.name != "__init__.py"}
        tree |= {p.name + "/" for p in (REPO / folder).iterdir() if p.is_dir() and p.name != "__pycache__"}
        assert named[folder] == tree, (
            f"{folder}/: missing {sorted(tree - named[folder])}, gone {sorted(named[folder] - tree)}"
        )
