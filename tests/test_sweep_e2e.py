"""`raygen sweep` end to end on the shared local Ray (2 CPUs): Tune over raygen's own training and
over sampling + eval of a registered model, MLflow parent/child runs behind a local server, ASHA.

Three sweeps share one workdir (one SQLite store): a 2-trial train sweep run to completion (its
best model is registered and then swept at sample time), a 3-trial sample sweep, and a 2-trial
train sweep in which ASHA stops the worse trial early. The first starts its own local MLflow
server in front of the store; the other two log to one server the module starts (as with a
tracking server of one's own), which saves a server start each.
"""

from __future__ import annotations

import os
import re
import time

import pytest
import yaml

pytestmark = pytest.mark.e2e

TINY = ["model.arch.dim=64", "model.arch.n_layer=2", "model.arch.n_head=2", "train.workers=1",
        "train.global_batch=16", "train.warmup_steps=2", "train.log_every=2", "train.checkpoint_every=8",
        "train.steps=8", "sample.per_label=2", "train.zero_stage=0"]


@pytest.fixture(scope="module")
def workdir(ray_local, tmp_path_factory):
    return tmp_path_factory.mktemp("sweep-e2e")


def _spec(workdir, name: str, body: dict):
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **body}))
    return str(path)


def _client(workdir):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{workdir.resolve()}/mlflow.db")


def _family(workdir, name: str):
    """(parent run, {trial id: child run}) of the newest sweep called `name`."""
    client = _client(workdir)
    exp = client.get_experiment_by_name("raygen")
    parent = client.search_runs([exp.experiment_id], filter_string=f"tags.`raygen.sweep` = '{name}' and "
                                                                    "attributes.run_name LIKE 'sweep-%'")[0]
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, {c.data.tags["raygen.sweep.trial"]: c for c in children}


@pytest.fixture(scope="module")
def train_sweep(workdir, digits8):
    """(exit code, stdout, stderr) of a 2-trial train sweep, both trials at once, run to the end."""
    import contextlib
    import io

    from raygen.cli import main

    spec = _spec(workdir, "tiny-lr", {
        "base": "demo", "data": str(digits8), "overrides": [*TINY, "train.cpus_per_worker=0.4"],
        "space": {"train.lr": {"grid": [3e-3, 1e-3]}}, "metric": "eval/class_acc", "scheduler": "none",
        "register": {"name": "sweep-tiny", "alias": "best"}})
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["sweep", spec, f"workdir={workdir}"])
    return code, out.getvalue(), err.getvalue()


def test_train_sweep_runs_each_trial_as_a_child_run_and_registers_the_best(workdir, train_sweep):
    code, out, err = train_sweep
    assert code == 0, err
    # 2 at once on an idle 2-CPU Ray; fewer while earlier tests' actors still hold CPU
    assert re.search(r"[12] at once; each trial 0\.1 CPU \(driver\) \+ workers 1 x 0\.4 CPU", out), out
    assert "registered: models:/sweep-tiny@best (version 1)" in out
    parent, children = _family(workdir, "tiny-lr")
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert parent.data.params["sweep.space.train.lr"] == "grid [0.003, 0.001]"
    assert parent.data.metrics["sweep/trials_finished"] == 2
    lrs = sorted(float(c.data.params["train.lr"]) for c in children.values())
    assert lrs == [1e-3, 3e-3]
    for c in children.values():
        assert c.info.status == "FINISHED" and c.data.tags["raygen.sweep.outcome"] == "finished"
        assert "eval/class_acc" in c.data.metrics and c.data.params["train.steps"] == "8"
        assert c.info.run_name.startswith("tiny-lr-")
    top = max(c.data.metrics["eval/class_acc"] for c in children.values())
    tied = {c.info.run_id for c in children.values() if c.data.metrics["eval/class_acc"] == top}
    client = _client(workdir)
    mv = client.get_model_version_by_alias("sweep-tiny", "best")
    # a tiny 8-step model can tie its sibling (20 samples): any of the best trials is right
    assert mv.run_id == parent.data.tags["raygen.sweep.best_run"] and mv.run_id in tied
    best = next(c for c in children.values() if c.info.run_id == mv.run_id)
    assert parent.data.metrics["best/eval/class_acc"] == best.data.metrics["eval/class_acc"]
    table = client.download_artifacts(parent.info.run_id, "sweep/results.txt", str(workdir))
    text = open(table).read()
    assert text.splitlines()[2].startswith(best.data.tags["raygen.sweep.trial"].rsplit("_", 1)[-1] + " *")
    assert text in out  # the printed table is the logged one
    # every log step reached Tune (metrics only) and only the parent/child runs were created
    history = client.get_metric_history(best.info.run_id, "train/loss")
    assert [m.step for m in history] == [2, 4, 6, 8]


def _cpus_settled(timeout: float = 60.0):
    """(free CPUs, all CPUs, placement groups still held) of the shared cluster once every CPU is
    free again or `timeout` passed: what a trial held is released asynchronously after it ends,
    and an in-process sweep sizes itself from the free CPUs."""
    import ray

    total, deadline = ray.cluster_resources()["CPU"], time.time() + timeout
    while ray.available_resources().get("CPU", 0) < total - 1e-6 and time.time() < deadline:
        time.sleep(1)
    held = {k: v["bundles"] for k, v in ray.util.placement_group_table().items() if v["state"] != "REMOVED"}
    return ray.available_resources().get("CPU", 0), total, held


@pytest.fixture(scope="module")
def server(workdir, train_sweep):
    from raygen.platform.tracking import LocalServer

    s = LocalServer(f"sqlite:///{workdir.resolve()}/mlflow.db", str(workdir), workdir / "logs")
    try:
        yield s.wait()
    finally:
        s.stop()


def test_sample_sweep_scores_knobs_of_the_registered_model(workdir, train_sweep, server, run_cli):
    assert train_sweep[0] == 0
    _cpus_settled()
    spec = _spec(workdir, "tiny-cfg", {
        "model": "models:/sweep-tiny@best", "n": 20, "overrides": ["eval.batch_size=10"],
        "space": {"sample.cfg_scale": {"grid": [1.0, 2.0, 3.0]}}, "metric": "eval/fd_digits",
        "register": {"alias": "best-fid"}})
    code, out, err = run_cli("sweep", spec, f"workdir={workdir}", "--tracking-uri", server)
    assert code == 0, err
    assert "MLflow server" not in out  # the store is a server already
    assert "sample it: raygen sample models:/sweep-tiny@best-fid  (the alias brings the best knobs: sample.cfg_scale=" in out
    parent, children = _family(workdir, "tiny-cfg")
    assert parent.info.status == "FINISHED" and len(children) == 3
    assert sorted(float(c.data.params["sample.cfg_scale"]) for c in children.values()) == [1.0, 2.0, 3.0]
    for c in children.values():
        assert c.info.status == "FINISHED" and c.data.params["eval.n"] == "20"
        assert c.data.metrics["eval/fd_digits"] > 0 and 0 <= c.data.metrics["eval/class_acc"] <= 1
    # (an 8-step model barely responds to CFG: the scores may tie, and the first trial wins a tie)
    fd = {float(c.data.params["sample.cfg_scale"]): c.data.metrics["eval/fd_digits"] for c in children.values()}
    best_cfgs = {k for k, v in fd.items() if v == min(fd.values())}
    best = next(c for c in children.values() if c.info.run_id == parent.data.tags["raygen.sweep.best_run"])
    assert float(best.data.params["sample.cfg_scale"]) == min(best_cfgs)
    client = _client(workdir)
    swept = client.get_model_version_by_alias("sweep-tiny", "best")
    mv = client.get_model_version_by_alias("sweep-tiny", "best-fid")
    assert mv.version == swept.version  # the same weights; the alias marks the best knobs
    assert float(mv.tags["raygen.sweep.best-fid.sample.cfg_scale"]) == min(best_cfgs)
    arts = {a.path for a in client.list_artifacts(best.info.run_id, "samples")}
    assert arts == {"samples/samples.png"}
    # Sampling through the alias uses the sweep's knobs; a flag still wins over them.
    best_cfg = float(mv.tags["raygen.sweep.best-fid.sample.cfg_scale"])
    for extra, cfg in (([], best_cfg), (["--cfg", "7.5"], 7.5)):
        code, out, err = run_cli("sample", "models:/sweep-tiny@best-fid", "--dry-run", *extra, f"workdir={workdir}",
                                 "--tracking-uri", server)
        assert code == 0, err
        assert f"#   sweep knobs: sample.cfg_scale={best_cfg}" in out
        assert yaml.safe_load(out.split("# derived")[0])["sample"]["cfg_scale"] == cfg
    code, out, err = run_cli("sample", "models:/sweep-tiny@best", "--dry-run", f"workdir={workdir}", "--tracking-uri", server)
    assert code == 0 and "sweep knobs" not in out  # the train sweep's alias tags no sampling knobs


def test_asha_stops_the_worse_train_trial_early(workdir, digits8, server, run_cli):
    # One trial at a time: the first (lr 3e-3) sets ASHA's bar at step 4; the second (lr 1e-7,
    # its loss still at the start) falls below it there and is stopped well before step 16.
    spec = _spec(workdir, "tiny-asha", {
        "base": "demo", "data": str(digits8), "overrides": [*TINY, "train.cpus_per_worker=0.4", "train.steps=16"],
        "space": {"train.lr": {"grid": [3e-3, 1e-7]}}, "max_concurrent_trials": 1,
        "scheduler": {"name": "asha", "grace_period": 4, "reduction_factor": 2}})
    _cpus_settled()
    code, out, err = run_cli("sweep", spec, f"workdir={workdir}", "--tracking-uri", server)
    assert code == 0, err
    assert "stopped early at step 4" in out
    parent, children = _family(workdir, "tiny-asha")
    assert parent.data.metrics["sweep/trials_finished"] == 1 and parent.data.metrics["sweep/trials_stopped"] == 1
    by_lr = {float(c.data.params["train.lr"]): c for c in children.values()}
    assert by_lr[3e-3].info.status == "FINISHED" and by_lr[3e-3].data.tags["raygen.sweep.outcome"] == "finished"
    stopped = by_lr[1e-7]
    assert stopped.info.status == "KILLED"
    assert stopped.data.tags["raygen.sweep.outcome"] == "stopped early at step 4 (ASHA)"
    steps = [m.step for m in _client(workdir).get_metric_history(stopped.info.run_id, "train/loss")]
    assert max(steps) < 16
    # The stopped trial's workers give their CPUs back. Ray Train's placement-group cleaner learns
    # that a stopped trial's controller died through the State API (init_ray starts the dashboard
    # for it); without it every stopped trial kept its workers' CPUs and later trials hung.
    free, total, held = _cpus_settled()
    assert free == pytest.approx(total), f"placement groups left: {held}"
    assert "RAY_API_SERVER_ADDRESS" not in os.environ  # pinned for Ray's own processes only


def test_ctrl_c_ends_the_sweep_with_what_ran_and_registers_nothing(workdir, train_sweep, server):
    # `raygen sweep` in its own process (and its own local Ray), interrupted as a user would.
    import signal
    import subprocess
    import sys

    spec = _spec(workdir, "tiny-ctrl-c", {
        "model": "models:/sweep-tiny@best", "n": 10, "overrides": ["eval.batch_size=10"],
        "space": {"sample.cfg_scale": {"grid": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5]}}, "metric": "eval/fd_digits",
        "max_concurrent_trials": 1, "register": {"alias": "ctrl-c"}})
    proc = subprocess.Popen([sys.executable, "-m", "raygen.cli", "sweep", spec, f"workdir={workdir}",
                             "--tracking-uri", server], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.match(r"sweep: trial \S+ finished", line):
            proc.send_signal(signal.SIGINT)
            break
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) == 130, out
    assert "sweep interrupted: nothing registered" in out
    ran = re.search(r"interrupted: (\d+) of 8 trials ran to their end", out)
    assert ran and 1 <= int(ran.group(1)) < 8, out
    parent, children = _family(workdir, "tiny-ctrl-c")
    assert parent.info.status == "KILLED" and parent.data.metrics["sweep/trials_finished"] >= 1
    assert {c.data.tags["raygen.sweep.outcome"] for c in children.values()} <= {"finished", "interrupted"}
    assert all(c.info.status != "RUNNING" for c in children.values())
    assert "ctrl-c" not in _client(workdir).get_registered_model("sweep-tiny").aliases
