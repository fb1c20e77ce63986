"""`raygen submit -- <command>` and `raygen jobs list|status|logs|stop`: Ray Jobs on a running cluster."""

from __future__ import annotations

import argparse
import shlex
import sys

from raygen import console

ADDRESS_HELP = "the cluster's dashboard, http://HEAD:8265; default: RAY_ADDRESS"


def add_parser(sub) -> None:
    p = sub.add_parser("submit", help="run a raygen command on a Ray cluster as a Ray job (Ray Jobs API)",
                       description="raygen submit [options] -- <raygen command>, e.g. "
                                   "`raygen submit --address http://127.0.0.1:8265 -- train --preset demo`")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--runtime-env", metavar="YAML_OR_JSON",
                   help="extra runtime env (a YAML/JSON file or inline JSON), merged over raygen's")
    p.add_argument("--workdir", help="the job's workdir when the command names none (default: ./work made "
                                     "absolute); on a real cluster a directory every node shares")
    p.add_argument("--tracking-uri", help="MLflow for the job (default: the command's tracking URI, "
                                          "MLFLOW_TRACKING_URI, or sqlite:///<workdir>/mlflow.db)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return; don't follow its logs")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="the raygen command to run")
    p.set_defaults(func=run_submit)

    j = sub.add_parser("jobs", help="the cluster's Ray jobs: list, status, logs, stop")
    verbs = j.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, func, help_ in (("list", run_list, "every job on the cluster"),
                              ("status", run_status, "one job's state (and error, if it failed)"),
                              ("logs", run_logs, "one job's output"), ("stop", run_stop, "stop a running job")):
        v = verbs.add_parser(name, help=help_)
        v.add_argument("--address", help=ADDRESS_HELP)
        if name != "list":
            v.add_argument("job_id", metavar="JOB")
        if name == "logs":
            v.add_argument("--follow", "-f", action="store_true", help="keep streaming until the job ends")
        v.set_defaults(func=func)


def run_submit(args: argparse.Namespace) -> int:
    from raygen.errors import UserError
    from raygen.platform.cluster import submission as sm

    command = args.command[1:] if args.command[:1] == ["--"] else list(args.command)
    if not command:
        raise UserError("no command to submit: `raygen submit [options] -- train --preset demo ...`")
    if command[0] in ("submit", "jobs"):
        raise UserError(f"`raygen {command[0]}` talks to the cluster from here; submit a job command (train, tokenize, ...)")
    from raygen.cli import build_parser

    parsed, _ = build_parser().parse_known_args(command)  # a bad command stops here, with its usage error
    plan = sm.plan_job(command, parsed, workdir=args.workdir, tracking_uri=args.tracking_uri,
                       runtime_env=args.runtime_env)
    cluster = sm.connect(args.address)
    job_id = sm.submit(cluster, plan)
    print(f"submitted {job_id} to {cluster.address}")
    print(f"  command:  raygen {shlex.join(plan.command)}")
    if plan.workdir:
        print(f"  workdir:  {plan.workdir}")
    print(f"  tracking: {plan.tracking_uri}")
    print(f"  follow:   raygen jobs logs {job_id} --follow   (status, stop: raygen jobs status|stop {job_id})")
    sys.stdout.flush()
    if args.no_wait:
        return 0
    try:
        details = sm.follow(cluster, job_id)
    except KeyboardInterrupt:
        print(f"\nraygen: stopped following; {job_id} keeps running (raygen jobs stop {job_id})", file=console.err())
        return 130
    return _report_end(job_id, details)


def _report_end(job_id: str, details) -> int:
    from raygen.platform.cluster import submission as sm

    status = sm.status_of(details)
    if status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED in {sm.duration(details)}")
    else:
        print(f"raygen: job {job_id} {status}: {sm.failure_summary(details)}", file=console.err())
    return sm.exit_code(details)


def run_list(args: argparse.Namespace) -> int:
    from raygen.platform.cluster import submission as sm

    cluster = sm.connect(args.address)
    jobs = sm.list_jobs(cluster)
    if not jobs:
        print(f"no jobs on {cluster.address}")
        return 0
    rows = [(sm.job_id_of(d), sm.status_of(d), sm.started(d), sm.duration(d), sm.command_of(d)) for d in jobs]
    widths = [max(len(r[i]) for r in rows + [("JOB", "STATUS", "STARTED", "TIME", "")]) for i in range(4)]
    for r in [("JOB", "STATUS", "STARTED", "TIME", "COMMAND"), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + (r[4] if len(r[4]) <= 100 else r[4][:97] + "..."))
    return 0


def run_status(args: argparse.Namespace) -> int:
    from raygen.platform.cluster import submission as sm

    d = sm.info(sm.connect(args.address), args.job_id)
    status = sm.status_of(d)
    print(f"{args.job_id}: {status} (started {sm.started(d)}, {sm.duration(d)})")
    print(f"command: raygen {sm.command_of(d)}")
    if status in ("FAILED", "STOPPED"):
        print(f"error: {sm.failure_summary(d)}")
        tail = [ln for ln in (d.message or "").splitlines() if ln.strip()][1:][-15:]
        if tail:
            print("last lines of its log:\n" + "\n".join(f"  {ln}" for ln in tail))
    elif d.message:
        print(d.message)
    return 0


def run_logs(args: argparse.Namespace) -> int:
    from raygen.platform.cluster import submission as sm

    cluster = sm.connect(args.address)
    if args.follow:
        sm.follow(cluster, args.job_id)
    else:
        sys.stdout.write(sm.logs(cluster, args.job_id))
    return 0


def run_stop(args: argparse.Namespace) -> int:
    from raygen.platform.cluster import submission as sm

    d = sm.stop(sm.connect(args.address), args.job_id)
    print(f"{args.job_id}: {sm.status_of(d)}")
    return 0
