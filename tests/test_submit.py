"""`raygen submit` / `raygen jobs` without a cluster: arguments, the job plan, auth, cluster.yaml.

The end-to-end half (a real `ray start` cluster, real jobs) is tests/test_submit_e2e.py.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from raygen.errors import UserError
from raygen.platform.cluster import submission as sm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_cluster_env(monkeypatch, tmp_path):
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE",
                "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.ray/auth_token of the machine's
    monkeypatch.chdir(tmp_path)


def _plan(*command, **kw):
    from raygen.cli import build_parser

    parsed, _ = build_parser().parse_known_args(list(command))
    return sm.plan_job(list(command), parsed, **kw)


# --------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["submit", "--", "tokenize", "--preset", "demo"],
    ["submit", "--no-wait", "--", "train", "--preset", "demo"],
    ["jobs", "list"],
    ["jobs", "status", "raysubmit_x"],
    ["jobs", "logs", "raysubmit_x", "--follow"],
    ["jobs", "stop", "raysubmit_x"],
])
def test_no_address_is_one_line_and_exit_2(argv, run_cli):
    code, out, err = run_cli(*argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("raygen: error: no Ray cluster to talk to")
    assert "--address http://HEAD:8265" in err and "RAY_ADDRESS" in err


@pytest.mark.parametrize("argv, says", [
    (["submit"], "no command to submit"),
    (["submit", "--"], "no command to submit"),
    (["submit", "--address", "http://x:8265", "--", "jobs", "list"], "talks to the cluster from here"),
    (["submit", "--address", "http://x:8265", "--runtime-env", "[1, 2]", "--", "tokenize"], "must be a mapping"),
    (["submit", "--address", "http://x:8265", "--runtime-env", "{pip: [", "--", "tokenize"], "not valid YAML/JSON"),
])
def test_submit_refuses_bad_arguments_before_contacting_anything(argv, says, run_cli):
    code, out, err = run_cli(*argv)
    assert code == 2 and says in err and err.count("\n") == 1, err


def test_a_bad_forwarded_command_is_refused_here(capsys):
    from raygen.cli import main

    with pytest.raises(SystemExit) as e:
        main(["submit", "--address", "http://x:8265", "--", "trian", "--preset", "demo"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'trian'" in err and err.count("\n") == 1


def test_an_unreachable_cluster_is_one_line(run_cli):
    code, _, err = run_cli("jobs", "list", "--address", "http://127.0.0.1:9")
    assert code == 2 and "cannot reach the Ray dashboard at http://127.0.0.1:9" in err and err.count("\n") == 1


def test_address_flag_wins_over_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://from-env:8265")
    assert sm.resolve_address("http://from-flag:8265/") == "http://from-flag:8265"
    assert sm.resolve_address(None) == "http://from-env:8265"
    seen = {}

    class FakeClient:
        def __init__(self, address, headers):
            seen.update(address=address, env=os.environ.get("RAY_ADDRESS"), headers=headers)

    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    cluster = sm.connect("http://from-flag:8265")
    # Ray's client would let RAY_ADDRESS override its argument; connect() hides it meanwhile
    assert cluster.address == seen["address"] == "http://from-flag:8265" and seen["env"] is None
    assert os.environ["RAY_ADDRESS"] == "http://from-env:8265"


def test_debug_after_the_double_dash_belongs_to_the_submitted_command():
    from raygen.cli import build_parser

    args = build_parser().parse_args(["submit", "--address", "a", "--", "train", "--debug", "x=1"])
    assert args.command == ["--", "train", "--debug", "x=1"]


# --------------------------------------------------------------------------------------
# The job plan: entrypoint, workdir, tracking URI, runtime env
# --------------------------------------------------------------------------------------


def test_plan_ships_the_project_and_runs_raygen_cli(tmp_path):
    plan = _plan("tokenize", "--preset", "demo")
    wd = str(tmp_path / "work")
    assert plan.command == ["tokenize", "--preset", "demo", f"workdir={wd}"]
    assert shlex.split(plan.entrypoint) == ["python", "-m", "raygen.cli", *plan.command]
    assert plan.workdir == wd and plan.tracking_uri == f"sqlite:///{wd}/mlflow.db"
    env = plan.runtime_env
    assert env["working_dir"] == str(ROOT) and env["env_vars"] == {"MLFLOW_TRACKING_URI": plan.tracking_uri}
    assert plan.submission_id.startswith("raygen-tokenize-")
    from ray._private.thirdparty.pathspec import PathSpec

    spec = PathSpec.from_lines("gitwildmatch", env["excludes"])
    for path in (".venv/bin/python", "work/mlflow.db", ".git/HEAD", "raygen/__pycache__/cli.cpython-311.pyc",
                 "raygen.egg-info/PKG-INFO", ".whl/torch.whl", "x/model.pt", "data/shard-00000.parquet"):
        assert spec.match_file(path), path
    for path in ("raygen/cli.py", "raygen/configs/demo.yaml", "pyproject.toml", "raygen/platform/train/driver.py"):
        assert not spec.match_file(path), path


def test_plan_makes_a_relative_workdir_absolute_and_keeps_an_absolute_one(tmp_path):
    assert _plan("train", "workdir=runs/a").command == ["train", "workdir=runs/a", f"workdir={tmp_path / 'runs/a'}"]
    assert _plan("train", "workdir=/shared/raygen").command == ["train", "workdir=/shared/raygen"]
    plan = _plan("train", "--preset", "demo", workdir="/shared/raygen")
    assert plan.command[-1] == "workdir=/shared/raygen" and plan.workdir == "/shared/raygen"
    assert plan.tracking_uri == "sqlite:////shared/raygen/mlflow.db"
    # the command's own workdir beats --workdir
    assert _plan("train", "workdir=/a", workdir="/b").workdir == "/a"
    # commands with a --workdir flag instead of overrides
    assert _plan("models", "list").command == ["models", "--workdir", str(tmp_path / "work"), "list"]
    assert _plan("models", "--workdir", "/m", "list").command == ["models", "--workdir", "/m", "list"]
    from raygen.cli import build_parser

    assert build_parser().parse_args(_plan("models", "--workdir", "m", "list").command).workdir == str(tmp_path / "m")
    # a command without a workdir is left alone
    assert _plan("data", "check", "/d").command == ["data", "check", "/d"]


def test_tracking_uri_precedence(monkeypatch):
    assert _plan("train", tracking_uri="http://flag:5000").tracking_uri == "http://flag:5000"
    assert _plan("train", "--tracking-uri", "http://cmd:5000").tracking_uri == "http://cmd:5000"
    assert _plan("train", "tracking.uri=http://override:5000").tracking_uri == "http://override:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert _plan("train").tracking_uri == "http://env:5000"
    assert _plan("train", "--tracking-uri", "http://cmd:5000").tracking_uri == "http://cmd:5000"
    plan = _plan("train", tracking_uri="http://flag:5000")
    assert plan.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://flag:5000"


def test_runtime_env_merges_inline_json_and_files(tmp_path):
    inline = json.dumps({"pip": ["einops"], "env_vars": {"NCCL_DEBUG": "INFO"}, "excludes": ["big/"]})
    env = _plan("train", runtime_env=inline).runtime_env
    assert env["pip"] == ["einops"] and env["env_vars"]["NCCL_DEBUG"] == "INFO"
    assert "MLFLOW_TRACKING_URI" in env["env_vars"] and env["excludes"][-1] == "big/"
    f = tmp_path / "env.yaml"
    f.write_text("env_vars:\n  MLFLOW_TRACKING_URI: http://mine:5000\nworking_dir: s3://bucket/pkg.zip\n")
    env = _plan("train", runtime_env=str(f)).runtime_env
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mine:5000" and env["working_dir"] == "s3://bucket/pkg.zip"
    with pytest.raises(UserError, match="env_vars must be a mapping"):
        _plan("train", runtime_env='{"env_vars": [1]}')


# --------------------------------------------------------------------------------------
# Token auth
# --------------------------------------------------------------------------------------


def test_auth_token_comes_from_where_ray_reads_it_in_rays_order(monkeypatch, tmp_path):
    assert sm.auth_headers() == {}
    home = Path(os.environ["HOME"])
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    assert sm.auth_headers() == {"Authorization": "Bearer from-home"}
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert sm.auth_token() == ("from-path", str(tmp_path / "tok"))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert sm.auth_headers() == {"Authorization": "Bearer from-env"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert sm.auth_headers() == {}
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="RAY_AUTH_TOKEN_PATH="):
        sm.auth_token()


# --------------------------------------------------------------------------------------
# Reporting a job's end
# --------------------------------------------------------------------------------------


def _details(status, message):
    return SimpleNamespace(status=status, message=message, submission_id="raygen-train-x", job_id=None,
                           entrypoint="python -m raygen.cli train --preset demo", start_time=1_000, end_time=66_000)


def test_a_failed_job_is_summed_up_by_its_own_error_line():
    d = _details("FAILED", "Job entrypoint command failed with exit code 2, last available logs:\nstarting\n"
                           "raygen: error: unknown config key 'train.bogus'; valid keys at train: ...\n")
    assert sm.failure_summary(d) == "unknown config key 'train.bogus'; valid keys at train: ..."
    d = _details("FAILED", "Job entrypoint command failed with exit code 1:\nTraceback ...\n  File x\nValueError: boom\n")
    assert sm.failure_summary(d) == "ValueError: boom"
    assert sm.exit_code(d) == 1 and sm.exit_code(_details("SUCCEEDED", "")) == 0
    assert sm.exit_code(_details("STOPPED", "")) == 1
    assert sm.command_of(d) == "train --preset demo" and sm.duration(d) == "1m05s"


def test_submit_exit_codes_follow_the_job(capsys):
    from raygen.jobs.submit import _report_end

    assert _report_end("j", _details("SUCCEEDED", "ok")) == 0
    assert "j SUCCEEDED" in capsys.readouterr().out
    assert _report_end("j", _details("FAILED", "x\nraygen: error: no such data set\n")) == 1
    assert capsys.readouterr().err == "raygen: job j FAILED: no such data set\n"


# --------------------------------------------------------------------------------------
# cluster.yaml
# --------------------------------------------------------------------------------------


def _validate_cluster_config(raw: dict) -> dict:
    """What `ray up` checks before it talks to the cloud: Ray's JSON schema on the file as
    written, then the defaults merged in and `validate_config`."""
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)
    cfg = prepare_config(raw)
    validate_config(cfg)
    return cfg


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg = _validate_cluster_config(raw)
    types = cfg["available_node_types"]
    head, gpu = types[cfg["head_node_type"]], types["gpu8"]
    assert "GPU" not in head["resources"] and head["max_workers"] == 0
    assert gpu["resources"]["GPU"] == 8 and gpu["node_config"]["InstanceType"] in ("p4d.24xlarge", "p5.48xlarge")
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= cfg["max_workers"]
    setup = "\n".join(cfg["setup_commands"])
    assert "torch==2.13.0" in setup and "download.pytorch.org/whl/cu" in setup and "pip install -q -e ~/raygen" in setup
    assert cfg["file_mounts"]["~/raygen"] == "."
    head_start = "\n".join(cfg["head_start_ray_commands"])
    assert "mlflow server --host 0.0.0.0 --port 5000" in head_start and "sqlite:////mnt/shared/raygen/" in head_start
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in "\n".join(cfg["worker_start_ray_commands"])
    assert any("/mnt/shared" in c for c in cfg["initialization_commands"])


def test_the_cluster_yaml_check_catches_mistakes():
    import jsonschema

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    bad = {**raw, "setup_comands": []}
    with pytest.raises(jsonschema.ValidationError):
        _validate_cluster_config(bad)
    bad = {**raw, "head_node_type": "nope"}
    with pytest.raises(ValueError, match="head_node_type"):
        _validate_cluster_config(bad)


def test_a_dashboard_address_is_not_for_running_here(tmp_path):
    # In a fresh process: this one may already have Ray up (the suite shares one instance).
    env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:8265"}
    r = subprocess.run([sys.executable, "-m", "raygen.cli", "tokenize", f"workdir={tmp_path}"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "is a dashboard" in r.stderr and "raygen submit" in r.stderr
    assert not (tmp_path / "data").exists()
