"""What reaches the terminal: raygen's own lines, not the libraries' logs.

raygen prints results to stdout and progress, notes and errors to `err()`. The libraries it
drives (Ray and its Data/Train/Tune layers, DeepSpeed, MLflow, their C++ cores) log to stderr. By
default the command line calls `quiet()` first: file descriptor 2 (so C++ logs as well as Python
loggers) is pointed at a log file, `err()` becomes a stream on the terminal's own stderr, and Ray
is started without forwarding its workers' output (it stays in the Ray session's log files).
`raygen --verbose ...` leaves everything as it was. A failing command names the log file.
"""

from __future__ import annotations

import atexit
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

_err: TextIO | None = None
_log: Path | None = None


def err() -> TextIO:
    """The stream for raygen's own stderr lines (the terminal's stderr, whatever the libraries do)."""
    return _err if _err is not None else sys.stderr


def log_path() -> Path | None:
    """The file the libraries' output goes to, when quiet."""
    return _log


def is_quiet() -> bool:
    return _log is not None


def quiet(directory: str | Path | None = None) -> Path | None:
    """Send file descriptor 2 to `<directory>/raygen-<time>-<pid>.log` (default: the temp dir's
    raygen-logs/) and keep the terminal's stderr for `err()`. No-op (None) when stderr is not a
    real file descriptor (a test capturing it) or when already quiet."""
    global _err, _log
    if _log is not None:
        return _log
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    if fd != 2:
        return None
    root = Path(directory) if directory else Path(tempfile.gettempdir()) / "raygen-logs"
    try:
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"raygen-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return None  # nowhere to write: stay verbose rather than fail
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(target, 2)
    os.close(target)
    _err = os.fdopen(saved, "w", buffering=1)
    _log = path
    atexit.register(_drop_if_empty, path)
    return path


def _drop_if_empty(path: Path) -> None:
    """A command whose libraries said nothing leaves no log file behind."""
    try:
        sys.stderr.flush()
        if path.stat().st_size == 0:
            path.unlink()
    except OSError:
        pass
