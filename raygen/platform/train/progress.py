"""Live training progress on the driver, from the metrics rank 0 already computes at each log step.

Rank 0 posts each log window's metrics to a small Ray actor (`ProgressBoard`, no CPU, a
fire-and-forget call: no collective, nothing per step beyond what the log window computes);
each worker group that starts (the first, and each one after a restart) says so. A thread on the
driver reads the board once a second and draws it with tqdm: a bar with step/total, loss,
samples/s, the data-wait fraction, elapsed and ETA, and the restarts so far when the console is
a terminal; plain lines at most every `interval` seconds (and at the end) otherwise, so CI logs and
files read cleanly.
"""

from __future__ import annotations

import threading
import time
from typing import Any, TextIO

from raygen import console


class ProgressBoard:
    """The latest log window of a run, and how many worker groups started (a Ray actor)."""

    def __init__(self) -> None:
        self.latest: tuple[int, dict[str, float]] | None = None
        self.starts = 0

    def started(self, step: int) -> None:
        self.starts += 1

    def update(self, step: int, metrics: dict[str, float]) -> None:
        self.latest = (step, metrics)

    def snapshot(self) -> dict[str, Any]:
        return {"latest": self.latest, "starts": self.starts}


def new_board():
    """A ProgressBoard actor on this Ray cluster (0 CPUs: it never competes with the workers)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(ProgressBoard).remote()


def clock(seconds: float) -> str:
    """Seconds -> "m:ss" or "h:mm:ss"."""
    s = int(max(seconds, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def describe(step: int, total: int, metrics: dict[str, float], elapsed: float, eta: float | None,
             restarts: int) -> str:
    """One progress line: step/total, loss, speed, data wait, elapsed, ETA, restarts."""
    parts = [f"step {step}/{total}", f"loss {metrics.get('train/loss', float('nan')):.4f}"]
    if "perf/samples_per_s" in metrics:
        parts.append(f"{metrics['perf/samples_per_s']:.1f} samples/s")
    if "perf/data_wait_frac" in metrics:
        parts.append(f"data wait {metrics['perf/data_wait_frac']:.0%}")
    parts.append(f"elapsed {clock(elapsed)}" + (f", ETA {clock(eta)}" if eta is not None else ""))
    if restarts:
        parts.append(f"restarts {restarts}")
    return " | ".join(parts)


class ProgressView:
    """Draws what the board says: a tqdm bar on a terminal, plain lines elsewhere."""

    def __init__(self, total: int, *, out: TextIO | None = None, interval: float = 30.0, start_step: int = 0):
        self.total, self.out, self.interval = total, out or console.err(), interval
        self.t0 = time.monotonic()
        self.first: tuple[int, float] | None = None  # (step, time) of the first window seen: the rate's origin
        self.last_line = -float("inf")
        self.printed: int | None = None  # the step of the last plain line
        self.step = start_step
        self.shown: tuple[int, int] | None = None  # (step, restarts) last drawn
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start_step, unit="step", file=self.out, dynamic_ncols=True,
                            desc="train", bar_format="{desc} {bar} {n_fmt}/{total_fmt} {postfix}")

    def eta(self, step: int) -> float | None:
        now = time.monotonic()
        if self.first is None or step <= self.first[0]:
            return None
        rate = (step - self.first[0]) / (now - self.first[1])
        return (self.total - step) / rate if rate > 0 else None

    def show(self, snapshot: dict[str, Any], *, final: bool = False) -> None:
        latest, restarts = snapshot.get("latest"), max(0, snapshot.get("starts", 0) - 1)
        if latest is None:
            return
        step, metrics = latest
        if self.first is None or step < self.first[0]:
            self.first = (step, time.monotonic())
        if self.shown == (step, restarts) and not (final and self.bar is None):
            return
        self.shown = (step, restarts)
        elapsed = time.monotonic() - self.t0
        line = describe(step, self.total, metrics, elapsed, self.eta(step), restarts)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(line.split(" | ", 1)[1], refresh=True)
            return
        now = time.monotonic()
        if (final and self.printed != step) or now - self.last_line >= self.interval:
            self.last_line, self.printed = now, step
            print(f"train: {line}", file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class ProgressThread:
    """Polls a board and draws it until stopped (a daemon thread on the driver)."""

    def __init__(self, board, view: ProgressView, period: float = 1.0):
        self.board, self.view, self.period = board, view, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raygen-progress", daemon=True)

    def _poll(self) -> dict[str, Any] | None:
        import ray

        try:
            return ray.get(self.board.snapshot.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - progress is best effort; training goes on without it
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            snap = self._poll()
            if snap:
                self.view.show(snap)

    def __enter__(self) -> ProgressThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        snap = self._poll()
        if snap and exc[0] is None:
            self.view.show(snap, final=True)
        self.view.close()
