"""Check the import contract (pyproject.toml, [tool.importlinter]) with import-linter.

import-linter reads a package from one directory, but `nfm`'s subpackages live in the stage folders at
the top of the repository (pyproject.toml maps them). So the check runs on the installed layout: a
temporary `nfm/` with the stage folders copied beneath it. `python -m tests.layers` prints the report
and exits non-zero on a broken contract (`make lint` runs it; so does the test suite).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("core", "teacher", "pairs", "student", "pipeline")


def installed_layout(dest: Path) -> Path:
    """dest/nfm/{__init__.py, teacher/, pairs/, student/, pipeline/}, Python sources only; returns dest."""
    skip = shutil.ignore_patterns("__pycache__", "weights", "*.pyc")
    shutil.copytree(REPO / "nfm", dest / "nfm", ignore=skip)
    for stage in STAGES:
        shutil.copytree(REPO / stage, dest / "nfm" / stage, ignore=skip)
    return dest


def lint_imports(edit: Callable[[Path], None] | None = None) -> subprocess.CompletedProcess:
    """Run lint-imports on the installed layout (after `edit(nfm_dir)`, if given)."""
    with tempfile.TemporaryDirectory() as tmp:
        site = installed_layout(Path(tmp) / "site")
        if edit is not None:
            edit(site / "nfm")
        exe = Path(sys.executable).with_name("lint-imports")
        env = {**os.environ, "PYTHONPATH": str(site)}
        cmd = [str(exe), str(REPO / "pyproject.toml"), "--no-cache"]
        return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)


if __name__ == "__main__":
    p = lint_imports()
    print(p.stdout + p.stderr)
    sys.exit(p.returncode)
