"""What a user sees: raygen's own lines on the console, the libraries' logs in a file, and live
training progress drawn from the metrics rank 0 reports."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from raygen.platform.train.progress import ProgressBoard, ProgressView, clock, describe

M = {"train/loss": 2.5, "perf/samples_per_s": 120.0, "perf/data_wait_frac": 0.04}


def test_a_progress_line_says_step_loss_speed_wait_time_and_restarts():
    assert clock(5) == "0:05" and clock(75) == "1:15" and clock(3725) == "1:02:05"
    line = describe(120, 600, M, 40.0, 160.0, 0)
    assert line == "step 120/600 | loss 2.5000 | 120.0 samples/s | data wait 4% | elapsed 0:40, ETA 2:40"
    assert describe(120, 600, M, 40.0, None, 2).endswith("elapsed 0:40 | restarts 2")


def test_off_a_terminal_plain_lines_come_at_the_interval_and_at_the_end():
    out = io.StringIO()
    board = ProgressBoard()
    view = ProgressView(100, out=out, interval=3600)
    view.show(board.snapshot())  # nothing reported yet: nothing drawn
    assert out.getvalue() == ""
    board.started(0)
    for step in (20, 40, 60):
        board.update(step, M)
        view.show(board.snapshot())
    board.started(40)  # a restart: a second worker group
    board.update(80, M)
    view.show(board.snapshot(), final=True)
    view.show(board.snapshot(), final=True)  # the end is drawn once
    lines = out.getvalue().splitlines()
    assert [ln.split(" | ")[0] for ln in lines] == ["train: step 20/100", "train: step 80/100"]
    assert lines[-1].endswith("restarts 1") and "ETA" in lines[-1]
    frequent = io.StringIO()
    view = ProgressView(100, out=frequent, interval=0)
    for step in (20, 20, 40):
        board.update(step, M)
        view.show(board.snapshot())
    assert len(frequent.getvalue().splitlines()) == 2  # a step already drawn is not drawn again


def test_on_a_terminal_a_tqdm_bar_is_redrawn_in_place():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    board = ProgressBoard()
    board.started(0)
    view = ProgressView(100, out=out)
    for step in (20, 40):
        board.update(step, M)
        view.show(board.snapshot())
    view.close()
    text = out.getvalue()
    assert "\r" in text and "train" in text and "40/100" in text and "loss 2.5000 | 120.0 samples/s" in text
    assert "train: step" not in text  # no plain lines on a terminal


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)


def test_quiet_sends_the_libraries_stderr_to_a_file_and_keeps_raygens_lines(tmp_path):
    code = f"""
import logging, os, sys
from raygen import console
path = console.quiet({str(tmp_path)!r})
logging.getLogger("ray.data").warning("a library's log line")
os.write(2, b"a C++ log line\\n")
print("raygen's own line", file=console.err())
print(path)
"""
    r = _run(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "raygen's own line\n"
    log = open(r.stdout.strip()).read()
    assert "a library's log line" in log and "a C++ log line" in log


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "dem"], "raygen: error: unknown preset 'dem'"),
    (["train", "--bogus"], "raygen: error: unrecognized arguments: --bogus"),
])
def test_errors_still_reach_the_console_when_quiet(argv, message, tmp_path):
    r = subprocess.run([sys.executable, "-m", "raygen.cli", *argv, f"workdir={tmp_path}"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith(message) and len(r.stderr.splitlines()) == 1, r.stderr


NOISE = ("SplitCoordinator", "TrainController", "RayTrainWorker", "TrainingReport(", "core_worker", "Execution plan",
         "streaming_executor", "INFO", "WARNING", "Deprecat", "mlflow.store", "PreemptionWatcher")


@pytest.mark.e2e
def test_the_training_console_carries_progress_and_no_library_internals(digits8, tmp_path):
    """The demo's training path as a user runs it (a process of its own, its own local Ray)."""
    r = subprocess.run([sys.executable, "-m", "raygen.cli", "train", "--preset", "demo", "--data", str(digits8),
                        f"workdir={tmp_path}", "train.steps=10", "train.log_every=5", "train.checkpoint_every=10",
                        "sample.per_label=1"], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stderr.splitlines()
    assert lines[0].startswith("train: ar-debug (1,055,232 parameters) on 2 worker(s), ZeRO-2, fp32; run ")
    assert any(ln.startswith("train: step 10/10 | loss ") and "samples/s | data wait" in ln for ln in lines), lines
    assert all(ln.startswith("train: ") for ln in lines), lines  # nothing but raygen's own progress lines
    console = r.stdout + r.stderr
    assert not [n for n in NOISE if n in console], console
    run_id = r.stdout.split()[1].rstrip(":")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert [a.path for a in client.list_artifacts(run_id, "logs")] == ["logs/raygen.log"]
    log = open(client.download_artifacts(run_id, "logs/raygen.log", str(tmp_path))).read()
    assert "mlflow" in log.lower() or "ray" in log.lower()  # the libraries' lines went there


def test_a_failing_worker_is_named_by_rank_with_its_last_line():
    from ray.train import WorkerGroupError

    from raygen.platform.train.driver import TrainingFailed

    cause = WorkerGroupError("2 workers failed", {1: RuntimeError("Traceback ...\n  File x\nRuntimeError: CUDA out of memory"),
                                                 0: RuntimeError("NCCL timeout")})
    message = TrainingFailed.of("abc123", cause).message
    assert message == "training failed (run abc123): rank 0: NCCL timeout; continue it with `raygen train --resume abc123`"
    one = WorkerGroupError("1 worker failed", {1: RuntimeError("Traceback ...\nRuntimeError: CUDA out of memory")})
    assert "rank 1: RuntimeError: CUDA out of memory;" in TrainingFailed.of("abc123", one).message
