"""`nfm report render | merge`."""

from __future__ import annotations

import argparse
from pathlib import Path

from nfm.pipeline.cli import options


def cmd_render(args) -> int:
    """write a finished run's report.md and figures again from its report.json

    The numbers are read, not recomputed (after an upgrade of nfm's report, or to render a report.json copied
    from another machine). `python -m nfm.pipeline.report RUN` is the same.
    """
    from nfm.pipeline.report import rerender

    print(f"report: {rerender(Path(args.run))}")
    return 0


def cmd_merge(args) -> int:
    """one report over the training seeds of several runs of the same command

    Train a run's seeds on several machines or in several sessions (`nfm run ... --seeds 1 --first-seed K`, or
    any runs of consecutive seeds), then join their reports: the runs must differ only in their seeds, and
    together give each seed once. The merged report.json, report.md and figures are those one run over all the
    seeds writes (the sample figures: the lowest seed's). A run's report.json is all the merge reads, so it
    runs wherever the reports are copied to.
    """
    from nfm.pipeline.run.merge import merge_reports

    print(f"report: {merge_reports([Path(r) for r in args.runs], Path(args.out))}")
    return 0


def register(stages: argparse._SubParsersAction) -> None:
    sub = options.add_group(stages, "report", "the report of `nfm run`: render it again, merge runs' seeds")
    p = options.add_command(sub, "render", cmd_render)
    p.add_argument("run", metavar="RUN", help="a finished `nfm run` directory (its report.json)")
    p = options.add_command(sub, "merge", cmd_merge)
    p.add_argument("runs", nargs="+", metavar="RUN", help="finished `nfm run` directories, each with its report.json")
    p.add_argument("--out", required=True, metavar="DIR", help="where the merged report goes (a new directory)")
