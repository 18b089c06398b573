"""python -m nfm.pipeline.report RUN_DIR: re-render report.md and the plots from report.json."""

import sys
from pathlib import Path

from nfm.pipeline.report import rerender

if len(sys.argv) != 2:
    sys.exit("usage: python -m nfm.pipeline.report RUN_DIR   (re-render report.md from report.json)")
print(rerender(Path(sys.argv[1])))
