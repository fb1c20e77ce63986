"""`raygen <job> ...`: the command line.

A user error (config key or value, path, data set) is one line on stderr and exit code 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from raygen import console
from raygen.errors import UserError, find_user_error
from raygen.families import all_families
from raygen.jobs import config as config_job
from raygen.jobs import data as data_job
from raygen.jobs import demo as demo_job
from raygen.jobs import eval as eval_job
from raygen.jobs import models as models_job
from raygen.jobs import report as report_job
from raygen.jobs import sample as sample_job
from raygen.jobs import submit as submit_job
from raygen.jobs import sweep as sweep_job
from raygen.jobs import tokenize as tokenize_job
from raygen.jobs import train as train_job

OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")

JOBS = (demo_job, tokenize_job, data_job, train_job, sample_job, eval_job, report_job, models_job, config_job,
        submit_job, sweep_job)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus where to get help) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"raygen: error: {message} (see `{self.prog} --help`)\n")

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        if message:
            console.err().write(message)  # the terminal, also when the libraries' stderr goes to a file
        sys.exit(status)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="raygen", description="Distributed training of token-based image generators on Ray.")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors (any position)")
    p.add_argument("--verbose", action="store_true",
                   help="show the libraries' logs (Ray, Ray Data/Train/Tune, DeepSpeed, MLflow) on the console "
                        "instead of a log file (any position)")
    sub = p.add_subparsers(dest="job", required=True, metavar="JOB", parser_class=_Parser)
    for job in JOBS:
        job.add_parser(sub)
    for family in all_families():  # verbs of the family plugins (e.g. `raygen cluster`)
        family.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line, before or after the job and its verbs; after a
    # `--` it belongs to the command that `raygen submit` runs on the cluster.
    cut = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:cut] or os.environ.get("RAYGEN_DEBUG") == "1"
    verbose = debug or "--verbose" in argv[:cut] or os.environ.get("RAYGEN_VERBOSE") == "1"
    argv = [a for a in argv[:cut] if a not in ("--debug", "--verbose")] + argv[cut:]
    if hasattr(sys.stdout, "reconfigure"):  # results and progress interleave in order, also through a pipe
        sys.stdout.reconfigure(line_buffering=True)
    if not verbose and argv[:1] != ["--help"] and "-h" not in argv[:cut]:
        console.quiet()  # the libraries' logs go to a file; raygen's own lines stay on the terminal
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options too (`raygen sample M --out x.png sample.top_k=5`),
    # which argparse's positional matching does not allow on its own.
    overrides = [a for a in extra if OVERRIDE.match(a)]
    unknown = [a for a in extra if not OVERRIDE.match(a)]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = list(args.overrides or []) + overrides
    if not debug:
        from raygen.platform.cluster.connect import quiet_worker_errors

        quiet_worker_errors()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("raygen: interrupted", file=console.err())
        return 130
    except Exception as e:  # noqa: BLE001 - the one place errors become exit codes
        user = find_user_error(e)
        if user is None or debug:
            if not console.is_quiet():
                raise
            import traceback

            traceback.print_exc()  # into the log, and on the console: a bug is not a one-liner
            traceback.print_exc(file=console.err())
            print(f"raygen: the libraries' logs are in {console.log_path()}", file=console.err())
            return 1
        print(f"raygen: error: {user.message}", file=console.err())
        return UserError.exit_code


if __name__ == "__main__":
    sys.exit(main())
