"""Ray Jobs: run a raygen command on a running cluster, follow it, list, inspect and stop jobs.

A submitted job is `python -m raygen.cli <command>` started by the cluster's job server in a
copy of this project (the runtime env's `working_dir`: the repo root minus .venv, work/, .git,
caches and large files; or `py_modules` when raygen is installed without its repo). Nothing
else is implied, so two things are made explicit before the job leaves this machine:

- the workdir (data, checkpoints, the default MLflow store): a relative one would land in the
  job's temporary copy of the project, so it is made absolute here (`workdir=` or `--workdir`
  is added to the command). On a real cluster give a directory every node shares.
- the MLflow tracking URI, passed as MLFLOW_TRACKING_URI in the runtime env.

Token auth (Ray 2.60): the dashboard's HTTP API wants `Authorization: Bearer <token>`. Ray's
own client adds it only when the client process runs with RAY_AUTH_MODE=token (read once, when
ray is imported), so the header is built here from the same sources Ray reads, in Ray's order:
RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token; RAY_AUTH_MODE=disabled sends none. The job's driver needs no token from us: it inherits RAY_AUTH_MODE and the
token location from the cluster's own processes, and Ray Jobs sets RAY_ADDRESS for it, so
`init_ray` joins that cluster. The token never goes into the runtime env, which Ray stores
in the job's record in plain text.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TextIO

from raygen import console
from raygen.config import yaml_problem
from raygen.errors import UserError

# gitignore-style patterns, relative to the repo root (Ray's own defaults add .git and .venv).
EXCLUDES = [
    "/.venv/", "/venv/", "/work/", "/.git/", "/.whl/", "__pycache__/", ".pytest_cache/", ".mypy_cache/",
    ".ruff_cache/", "*.egg-info/", "mlruns/", "mlartifacts/", "mlflow.db", "*.whl", "*.pt", "*.pth", "*.ckpt",
    "*.safetensors", "*.parquet", "*.npz",
]
ENTRYPOINT = ["python", "-m", "raygen.cli"]
ADDRESS_HINT = ("give --address http://HEAD:8265 (the Ray dashboard; `ray dashboard cluster.yaml` forwards it to "
                "http://127.0.0.1:8265) or set RAY_ADDRESS")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


# --------------------------------------------------------------------------------------
# Connecting: address and token
# --------------------------------------------------------------------------------------


def resolve_address(address: str | None) -> str:
    """--address, else RAY_ADDRESS; http(s)://HOST:8265 is the dashboard (Ray also takes a GCS
    address, HOST:6379, and finds the dashboard through it)."""
    addr = (address or os.environ.get("RAY_ADDRESS") or "").strip()
    if not addr:
        raise UserError(f"no Ray cluster to talk to: {ADDRESS_HINT}")
    return addr.rstrip("/")


def auth_token() -> tuple[str | None, str]:
    """(token or None, where it came from), in Ray's own order of precedence."""
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path}: {e.strerror}") from None
        if not token:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path} is empty")
        return token, path
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        token = default.read_text().strip()
        if token:
            return token, str(default)
    return None, "no token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)"


def auth_headers() -> dict[str, str]:
    token, _ = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


@contextlib.contextmanager
def _no_address_env() -> Iterator[None]:
    # JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override its `address`
    # argument; here --address must win.
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def _cluster_errors(address: str) -> Iterator[None]:
    """Connection and auth failures -> one line that says what to do."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as e:
        _, source = auth_token()
        if "Authentication required" in str(e):
            raise UserError(f"the Ray cluster at {address} wants an auth token and none was found ({source}); "
                            "copy the head node's ~/.ray/auth_token here (`ray get-auth-token` on the head) "
                            "or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH") from None
        raise UserError(f"the Ray cluster at {address} rejected the auth token from {source}; "
                        "use the head node's token (`ray get-auth-token` on the head)") from None
    except ConnectionError as e:
        raise UserError(f"cannot reach the Ray dashboard at {address} ({e}); is the cluster up (`ray up cluster.yaml`) "
                        "and its dashboard forwarded (`ray dashboard cluster.yaml`)?") from None


@dataclass
class Cluster:
    address: str
    client: Any  # ray.job_submission.JobSubmissionClient


def connect(address: str | None) -> Cluster:
    """The job server at --address / RAY_ADDRESS, with the auth header set."""
    addr = resolve_address(address)
    from ray.job_submission import JobSubmissionClient

    with _cluster_errors(addr), _no_address_env():
        return Cluster(addr, JobSubmissionClient(addr, headers=auth_headers()))


@contextlib.contextmanager
def _job_errors(cluster: Cluster, job_id: str) -> Iterator[None]:
    with _cluster_errors(cluster.address):
        try:
            yield
        except RuntimeError as e:
            if "status code 404" in str(e) or "does not exist" in str(e):
                raise UserError(f"no job '{job_id}' on {cluster.address} (see `raygen jobs list`)") from None
            raise


# --------------------------------------------------------------------------------------
# Planning a submission
# --------------------------------------------------------------------------------------


def project_runtime_env() -> dict[str, Any]:
    """Ship this project: the repo root as working_dir, or the raygen package as a py_module."""
    import raygen

    package = Path(raygen.__file__).resolve().parent
    root = package.parent
    if (root / "pyproject.toml").is_file():
        return {"working_dir": str(root), "excludes": list(EXCLUDES)}
    return {"py_modules": [str(package)], "excludes": list(EXCLUDES)}


def load_runtime_env(text: str | None) -> dict[str, Any]:
    """--runtime-env: a YAML or JSON file, or inline JSON/YAML."""
    if not text:
        return {}
    import yaml

    path = Path(text).expanduser()
    source = f"--runtime-env file '{text}'" if path.is_file() else "--runtime-env"
    try:
        data = yaml.safe_load(path.read_text() if path.is_file() else text)
    except yaml.YAMLError as e:
        raise UserError(f"{source} is not valid YAML/JSON{yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{source} must be a mapping (e.g. '{{\"pip\": [\"einops\"]}}' or a YAML file); "
                        f"got {text!r}")
    return data


def merge_runtime_env(base: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """The user's runtime env on top of ours: env_vars merge (theirs win), excludes add up."""
    env = dict(base)
    for key, value in user.items():
        if key == "env_vars":
            if not isinstance(value, dict):
                raise UserError("--runtime-env env_vars must be a mapping of names to strings")
            env["env_vars"] = {**env.get("env_vars", {}), **{str(k): str(v) for k, v in value.items()}}
        elif key == "excludes":
            env["excludes"] = [*env.get("excludes", []), *value]
        else:
            if key == "working_dir":
                env.pop("py_modules", None)
            env[key] = value
    return env


def _last_value(command: list[str], key: str) -> str | None:
    """The last `key=value` override or `--flag value` / `--flag=value` in the command."""
    found = None
    for i, arg in enumerate(command):
        if key.startswith("--"):
            if arg == key and i + 1 < len(command):
                found = command[i + 1]
            elif arg.startswith(key + "="):
                found = arg.split("=", 1)[1]
        elif arg.startswith(key + "="):
            found = arg.split("=", 1)[1]
    return found


def _without_flag(command: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for arg in command:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def _abspath(path: str) -> str:
    # No symlink resolution: the path has to mean the same on the cluster's nodes.
    return os.path.abspath(os.path.expanduser(path))


@dataclass
class JobPlan:
    command: list[str]  # what runs after `python -m raygen.cli`
    workdir: str | None  # None: the command has no workdir
    tracking_uri: str
    runtime_env: dict[str, Any]
    entrypoint: str
    submission_id: str


def plan_job(command: list[str], parsed, *, workdir: str | None = None, tracking_uri: str | None = None,
             runtime_env: str | None = None) -> JobPlan:
    """Turn `raygen submit [...] -- <command>` into what the job server gets.

    `parsed` is the command parsed by raygen's own CLI parser (its attributes say which of
    `overrides`, `--workdir`, `--preset`, `--tracking-uri` the command takes).
    """
    command = list(command)
    takes_overrides = hasattr(parsed, "overrides")
    takes_workdir_flag = hasattr(parsed, "workdir") and not takes_overrides
    in_command = _last_value(command, "workdir") if takes_overrides else (
        _last_value(command, "--workdir") if takes_workdir_flag else None)
    preset = None
    if takes_overrides and getattr(parsed, "preset", None):
        from raygen.config import load_config

        try:  # a preset may set workdir / tracking.uri; a bad one fails in the job, with its message
            preset = load_config(parsed.preset)
        except UserError:
            preset = None
    job_workdir = None
    if takes_overrides or takes_workdir_flag:
        chosen = in_command or workdir or (preset.workdir if preset else None) or "work"
        job_workdir = _abspath(chosen)
        if in_command != job_workdir and takes_overrides:  # the last override counts
            command = [*command, f"workdir={job_workdir}"]
        elif in_command != job_workdir:  # `--workdir` belongs to the job's own parser: right after its name
            command = [command[0], "--workdir", job_workdir, *_without_flag(command[1:], "--workdir")]
    uri = (tracking_uri or getattr(parsed, "tracking_uri", None) or _last_value(command, "tracking.uri")
           or os.environ.get("MLFLOW_TRACKING_URI") or (preset.tracking.uri if preset else None)
           or f"sqlite:///{Path(job_workdir or _abspath('work')) / 'mlflow.db'}")
    env = project_runtime_env()
    env["env_vars"] = {"MLFLOW_TRACKING_URI": uri}
    env = merge_runtime_env(env, load_runtime_env(runtime_env))
    job = command[0] if command else "job"
    sid = f"raygen-{job}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    return JobPlan(command, job_workdir, uri, env, shlex.join([*ENTRYPOINT, *command]), sid)


def submit(cluster: Cluster, plan: JobPlan) -> str:
    with _cluster_errors(cluster.address):
        try:
            return cluster.client.submit_job(entrypoint=plan.entrypoint, runtime_env=plan.runtime_env,
                                     submission_id=plan.submission_id)
        except (ValueError, TypeError, FileNotFoundError) as e:  # a bad runtime env
            raise UserError(f"the job's runtime env was refused: {e}") from None


# --------------------------------------------------------------------------------------
# Following and inspecting jobs
# --------------------------------------------------------------------------------------


def status_of(details) -> str:
    return getattr(details.status, "value", str(details.status))


def info(cluster: Cluster, job_id: str):
    with _job_errors(cluster, job_id):
        return cluster.client.get_job_info(job_id)


def logs(cluster: Cluster, job_id: str) -> str:
    with _job_errors(cluster, job_id):
        return cluster.client.get_job_logs(job_id)


def list_jobs(cluster: Cluster) -> list:
    with _cluster_errors(cluster.address):
        jobs = cluster.client.list_jobs()
    return sorted(jobs, key=lambda j: j.start_time or 0)


def stop(cluster: Cluster, job_id: str, *, wait_s: float = 60.0):
    """Ask the job to stop; wait (a while) for it to reach a terminal state."""
    with _job_errors(cluster, job_id):
        cluster.client.stop_job(job_id)
    return wait(cluster, job_id, timeout_s=wait_s)


def wait(cluster: Cluster, job_id: str, *, timeout_s: float | None = None, poll_s: float = 1.0):
    start = time.monotonic()
    while True:
        details = info(cluster, job_id)
        if status_of(details) in TERMINAL or (timeout_s is not None and time.monotonic() - start > timeout_s):
            return details
        time.sleep(poll_s)


def follow(cluster: Cluster, job_id: str, out: TextIO | None = None):
    """Stream the job's logs until it ends; returns its final JobDetails."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in cluster.client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    with _job_errors(cluster, job_id):
        try:
            asyncio.run(tail())
        except RuntimeError as e:  # the log socket closed early: fall back to polling
            if "does not exist" in str(e):
                raise
            print(f"(log stream ended early: {e}; waiting for the job)", file=console.err())
    return wait(cluster, job_id)


def exit_code(details) -> int:
    return 0 if status_of(details) == "SUCCEEDED" else 1


def failure_summary(details) -> str:
    """One line: raygen's own `raygen: error: ...` line if the driver printed one, else the
    last line of the job's message (a traceback ends with the exception)."""
    lines = [ln.rstrip() for ln in (details.message or "").splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("raygen: error:")]
    if ours:
        return ours[-1].removeprefix("raygen: error:").strip()
    return lines[-1].strip() if lines else f"job {status_of(details)}"


def job_id_of(details) -> str:
    return details.submission_id or details.job_id or "?"


def command_of(details) -> str:
    """The raygen command of a job (its entrypoint without `python -m raygen.cli`)."""
    prefix = shlex.join(ENTRYPOINT) + " "
    return details.entrypoint[len(prefix):] if details.entrypoint.startswith(prefix) else details.entrypoint


def duration(details) -> str:
    if not details.start_time:
        return "-"
    end = details.end_time or time.time() * 1000
    s = max(0, int((end - details.start_time) / 1000))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def started(details) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(details.start_time / 1000)) if details.start_time else "-"
