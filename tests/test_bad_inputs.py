"""Bad inputs a user can give: each is one line naming the thing and what is allowed, exit code 2,
before any work, and nothing written."""

from __future__ import annotations

import time

import pytest

from raygen.errors import ConfigError, UserError


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*"))


def test_a_preset_with_a_yaml_syntax_error_is_one_line(run_cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1\n")
    code, out, err = run_cli("train", "--preset", str(bad), f"workdir={tmp_path / 'w'}", "--dry-run")
    assert code == 2 and out == ""
    assert err == f"raygen: error: preset '{bad}' is not valid YAML at line 3, column 1: expected ',' or ']', " \
                  "but got '<stream end>'\n"
    spec = tmp_path / "s.yaml"
    spec.write_text("space: {a: [1\n")
    code, _, err = run_cli("sweep", str(spec), "--dry-run")
    assert code == 2 and len(err.splitlines()) == 1 and "is not valid YAML at line 2" in err


def test_more_workers_than_the_cpus_can_run_are_refused_unless_forced(tmp_path):
    from raygen.config import load_config
    from raygen.platform.train.driver import plan_training
    from tests.test_shards import make_dataset

    root = make_dataset(tmp_path / "ids")
    base = ["model.arch.dim=32", "model.arch.n_layer=1", "model.arch.n_head=2", "train.global_batch=48",
            f"workdir={tmp_path}"]
    with pytest.raises(ConfigError, match=r"train.workers=16 on a cluster with 2 CPUs leaves 0.06 CPU per worker "
                                          r"\(one CPU stays with Ray Data; the floor is 0.5\): use train.workers <= 2, "
                                          r"or set train.cpus_per_worker to force this split"):
        plan_training(load_config(None, [*base, "train.workers=16"]), cluster_cpus=2, cluster_gpus=0,
                      data_dir=str(root))
    forced = plan_training(load_config(None, [*base, "train.workers=16", "train.cpus_per_worker=0.1"]),
                           cluster_cpus=2, cluster_gpus=0, data_dir=str(root))
    assert (forced.workers, forced.cpus_per_worker) == (16, 0.1)
    fine = plan_training(load_config(None, [*base, "train.workers=2"]), cluster_cpus=2, cluster_gpus=0,
                         data_dir=str(root))
    assert fine.cpus_per_worker == 0.5
    assert plan_training(load_config(None, [*base, "train.workers=12"]), cluster_cpus=16, cluster_gpus=0,
                         data_dir=str(root)).cpus_per_worker == 1.25


def test_an_output_file_that_cannot_be_written_is_refused_before_the_work(tmp_path):
    from raygen.jobs.common import check_writable

    check_writable(str(tmp_path / "new" / "deeper" / "s.png"), "--out")  # directories it would make: fine
    assert _files(tmp_path) == []  # checking wrote nothing
    with pytest.raises(UserError, match=r"--out '.*' is a directory; give a file name"):
        check_writable(str(tmp_path), "--out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"--out '.*file/s.png': '.*file' is not a directory"):
        check_writable(str(tmp_path / "file" / "s.png"), "--out")
    with pytest.raises(UserError, match=r"--out '/proc/s.png' cannot be written"):
        check_writable("/proc/s.png", "--out")
    check_writable(str(tmp_path), "--out", directory=True)  # an existing directory to write into
    with pytest.raises(UserError, match=r"--out '.*file' is a file; give a directory"):
        check_writable(str(tmp_path / "file"), "--out", directory=True)
    with pytest.raises(UserError, match=r"--out '/proc/data' cannot be written"):
        check_writable("/proc/data", "--out", directory=True)
    assert [str(f) for f in _files(tmp_path)] == ["file"]


def test_tokenizing_into_a_place_that_cannot_be_written_is_refused_before_ray_starts(run_cli, tmp_path):
    code, _, err = run_cli("tokenize", "--preset", "demo", "--out", "/proc/digits", f"workdir={tmp_path}")
    assert code == 2 and err == "raygen: error: the data set directory (--out / data.shards) '/proc/digits' cannot " \
                                "be written: No such file or directory\n"
    code, _, err = run_cli("train", "--preset", "demo", "workdir=/proc/work")  # no data set there: before Ray
    assert code == 2 and err == "raygen: error: '/proc/work/data/digits-palette-8' is not a tokenized data set: it " \
                                "has no manifest.json (make one with `raygen tokenize`)\n"


def test_an_unreachable_tracking_server_is_one_line_and_quick(run_cli, tmp_path, monkeypatch):
    from raygen.platform.cluster.connect import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    code, _, err = run_cli("models", "--workdir", str(tmp_path), "--tracking-uri", uri, "list")
    assert code == 2 and time.perf_counter() - t0 < 10
    assert err == f"raygen: error: cannot reach the MLflow tracking server {uri} (tracking.uri): connection refused; " \
                  "start it, or unset tracking.uri to track in sqlite:///<workdir>/mlflow.db\n"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code, _, err = run_cli("sample", "models:/digits-ar@latest", f"workdir={tmp_path}", "--out", str(tmp_path / "s.png"))
    assert code == 2 and f"{uri} (MLFLOW_TRACKING_URI): connection refused" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s.png").exists()


def test_sampling_knobs_out_of_range_are_config_errors(run_cli, tmp_path):
    code, _, err = run_cli("sample", "models:/digits-ar@latest", f"workdir={tmp_path}", "--top-p", "2")
    assert code == 2 and err == "raygen: error: bad value for 'sample.top_p': 2.0; allowed: 0 <= value <= 1\n"
