"""User-facing errors: one clear line, exit code 2, no traceback unless --debug."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: a config key or value, a path, a data set, a model URI."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # survive pickling across Ray workers
        return (type(self), (self.message,))


class ConfigError(UserError):
    """An unknown config key or a value that is not allowed."""


class DataError(UserError):
    """Bad input data: unreadable images, an empty source, a manifest that does not match."""


def find_user_error(exc: BaseException) -> UserError | None:
    """Find the original UserError inside an exception chain.

    Ray wraps a worker-side exception (RayTaskError, UserCodeException, ...); the original
    instance is reachable through `.cause`, `__cause__` or `__context__`.
    """
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        # Ray's RayTaskError subclasses the original class dynamically; only a class of
        # our own is the genuine article with a clean message.
        if isinstance(e, UserError) and type(e).__module__.split(".")[0] == "raygen":
            return e
        for attr in ("cause", "__cause__", "__context__", "controller_failure"):
            nxt = getattr(e, attr, None)
            if isinstance(nxt, BaseException):
                stack.append(nxt)
        # Ray Train's WorkerGroupError keeps each failed worker's exception by rank
        stack += [w for w in (getattr(e, "worker_failures", None) or {}).values() if isinstance(w, BaseException)]
    return None
