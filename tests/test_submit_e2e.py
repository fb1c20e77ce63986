"""`raygen submit` / `raygen jobs` against a real Ray cluster started with `ray start --head`.

One cluster for the module (2 CPUs, token auth on, every port chosen free, its own temp dir),
torn down by its own processes: `ray stop` would stop every Ray on the machine. The jobs
share one workdir, standing in for a cluster's shared disk.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

TINY = ["model.arch.dim=64", "model.arch.n_layer=2", "model.arch.n_head=2", "train.workers=1", "train.steps=4",
        "train.global_batch=16", "train.log_every=2", "train.checkpoint_every=4", "sample.per_label=1"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cluster_processes(temp_dir: str):
    """The processes of the cluster whose files live in temp_dir, with all their children."""
    import psutil

    found = {}
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if p.pid != os.getpid() and temp_dir in " ".join(p.info["cmdline"] or []):
                found[p.pid] = p
                found.update({c.pid: c for c in p.children(recursive=True)})
    return list(found.values())


def _stop_cluster(temp_dir: str) -> None:
    import psutil

    procs = _cluster_processes(temp_dir)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


@pytest.fixture(scope="module")
def cluster():
    """http://127.0.0.1:<dashboard> of a fresh head node, with this process holding its token."""
    temp = tempfile.mkdtemp(prefix="rg-ray-")  # short: Ray's socket paths must stay under ~107 chars
    token = Path(temp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    gcs, dash, client, agent_http, agent_grpc, metrics, env_agent, node_mgr, obj_mgr = _free_ports(9)
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI")}
    # the cluster's nodes run with an activated environment, as on a real cluster (`python` = this one)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), PATH=f"{venv_bin}:{env.get('PATH', '')}")
    cmd = [f"{venv_bin}/ray", "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}",
           f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}", "--num-cpus=2",
           f"--temp-dir={temp}", "--disable-usage-stats"]
    mp = pytest.MonkeyPatch()
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
            mp.delenv(key, raising=False)
        mp.setenv("RAY_AUTH_TOKEN_PATH", str(token))  # this process is the client: `raygen` reads it
        yield f"http://127.0.0.1:{dash}"
    finally:
        mp.undo()
        _stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("shared")


def cli(*argv: str) -> tuple[int, str, str]:
    """`raygen ...` in this process (module fixtures can't use capsys)."""
    from raygen.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def _submitted_id(out: str) -> str:
    return re.search(r"^submitted (\S+) to ", out, re.M).group(1)


JOBS: dict[str, str] = {}


@pytest.fixture(scope="module")
def failing_job(cluster, workdir):
    """A job with a bad config key, submitted without waiting (it runs beside the others)."""
    code, out, err = cli("submit", "--address", cluster, "--no-wait", "--", "train", "--preset", "demo",
                         f"workdir={workdir}", "train.bogus=1")
    assert code == 0, err
    JOBS["failing"] = _submitted_id(out)
    return JOBS["failing"]


def test_tokenize_and_train_jobs_succeed_and_the_run_is_in_mlflow(cluster, workdir, failing_job):
    start = time.monotonic()
    code, out, err = cli("submit", "--address", cluster, "--", "tokenize", "--preset", "demo", f"workdir={workdir}")
    assert code == 0, out[-3000:] + err[-3000:]
    JOBS["tokenize"] = _submitted_id(out)
    assert re.search(r"^1797 rows in \d+ shards", out, re.M) and f"job {JOBS['tokenize']} SUCCEEDED" in out
    assert (workdir / "data" / "digits-palette-8" / "manifest.json").is_file()
    tokenize_s = time.monotonic() - start

    code, out, err = cli("submit", "--address", cluster, "--", "train", "--preset", "demo", f"workdir={workdir}", *TINY)
    assert code == 0, out[-3000:] + err[-3000:]
    JOBS["train"] = _submitted_id(out)
    uri = f"sqlite:///{workdir}/mlflow.db"
    assert f"  tracking: {uri}" in out and f"job {JOBS['train']} SUCCEEDED" in out
    run_id = re.search(r"^run ([0-9a-f]{32}): 4 steps", out, re.M).group(1)
    print(f"tokenize job {tokenize_s:.0f} s, train job {time.monotonic() - start - tokenize_s:.0f} s")

    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and "train/loss" in run.data.metrics
    assert run.data.params["workdir"] == str(workdir)
    # checkpoints went to RunConfig(storage_path=<workdir>/checkpoints): the "shared disk"
    assert (workdir / "checkpoints" / f"raygen-{run_id}" / "step_00000004").is_dir()

    # The job's driver joined this cluster (RAY_ADDRESS from Ray Jobs) instead of starting its own Ray.
    from raygen.platform.cluster import submission as sm

    details = sm.info(sm.connect(cluster), JOBS["train"])
    assert details.driver_info is not None and details.job_id


def test_a_failed_job_shows_failed_with_its_error(cluster, failing_job):
    from raygen.platform.cluster import submission as sm

    sm.wait(sm.connect(cluster), failing_job, timeout_s=300)
    code, out, err = cli("jobs", "status", failing_job, "--address", cluster)
    assert code == 0, err
    assert f"{failing_job}: FAILED" in out
    assert "error: unknown config key 'train.bogus'; valid keys at train:" in out
    code, out, _ = cli("jobs", "logs", failing_job, "--address", cluster)
    assert code == 0 and "raygen: error: unknown config key 'train.bogus'" in out


def test_jobs_list_shows_every_job(cluster, failing_job):
    code, out, err = cli("jobs", "list", "--address", cluster)
    assert code == 0, err
    assert out.splitlines()[0].split() == ["JOB", "STATUS", "STARTED", "TIME", "COMMAND"]
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert rows[failing_job] == "FAILED" and "train --preset demo workdir=" in out
    for name in ("tokenize", "train"):  # when the test above ran
        assert name not in JOBS or rows[JOBS[name]] == "SUCCEEDED"


def test_stop_a_job(cluster, workdir):
    code, out, err = cli("submit", "--address", cluster, "--no-wait", "--", "train", "--preset", "demo",
                         f"workdir={workdir}", *TINY, "train.steps=100000")
    assert code == 0, err
    job = _submitted_id(out)
    code, out, err = cli("jobs", "stop", job, "--address", cluster)
    assert code == 0 and out.strip() == f"{job}: STOPPED", out + err


def test_unknown_job_and_bad_tokens_are_one_line(cluster, monkeypatch, tmp_path):
    code, _, err = cli("jobs", "status", "raysubmit_nope", "--address", cluster)
    assert code == 2 and err == f"raygen: error: no job 'raysubmit_nope' on {cluster} (see `raygen jobs list`)\n"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    code, _, err = cli("jobs", "list", "--address", cluster)
    assert code == 2 and "rejected the auth token from RAY_AUTH_TOKEN" in err and err.count("\n") == 1
    # No token anywhere: in a fresh process, since Ray's client adds a token of its own when this
    # process has token auth on (a local Ray started by another test turns it on).
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    r = subprocess.run([str(Path(sys.executable).parent / "raygen"), "jobs", "list", "--address", cluster],
                       env={**env, "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "wants an auth token and none was found" in r.stderr, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and r.stdout == ""
