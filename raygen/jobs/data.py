"""`raygen data check DIR`: verify a tokenized data set against its manifest."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="inspect tokenized data sets")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    c = verbs.add_parser("check", help="verify counts, checksums, schema and token range; print a summary")
    c.add_argument("dir", help="a directory written by `raygen tokenize`")
    c.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    from raygen.platform.data.shards import check_dataset, format_report

    report = check_dataset(args.dir)
    print(format_report(args.dir, report))
    return 0 if report.ok else 2
