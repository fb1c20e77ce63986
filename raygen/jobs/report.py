"""`raygen report RUN`: one table of a run's model, training and sampling figures and eval metrics.

`raygen report RUN1 RUN2 ...`: the evaluated models side by side in the papers' layout, each with the
paper's own row when its evaluation used `--protocol paper`.
"""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="one table: model, training and sampling throughput, memory, eval metrics")
    p.add_argument("run", nargs="+", help="a run id, runs:/RUN_ID or models:/NAME@ALIAS; several: a paper-style table")
    p.add_argument("--workdir", default="work", help="where the default MLflow store lives")
    p.add_argument("--tracking-uri", help="= tracking.uri")
    p.add_argument("--no-sampling", action="store_true", help="skip measuring sampling speed and memory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raygen.platform.evaluate.scoring import paper_table, report

    if len(args.run) > 1:
        print(paper_table(args.run, workdir=args.workdir, tracking_uri=args.tracking_uri,
                          measure=not args.no_sampling)["text"], end="")
        return 0
    r = report(args.run[0], workdir=args.workdir, tracking_uri=args.tracking_uri, measure=not args.no_sampling)
    print(r["text"], end="")
    print(f"logged as report.txt to run {r['run_id']}")
    return 0
