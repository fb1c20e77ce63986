"""Connecting to Ray: a local instance by default, a real cluster when an address is given."""

from __future__ import annotations

import logging
import os

from raygen.config import RayConfig


def init_ray(cfg: RayConfig) -> None:
    """Start or join Ray once per process.

    A bare `ray.init()` attaches to whatever /tmp/ray/ray_current_cluster names, even a dead
    cluster, so without an address we start a fresh local instance explicitly. Inside a Ray
    job (`raygen submit`) Ray Jobs sets RAY_ADDRESS to its cluster's GCS, so the job joins it.
    """
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        from raygen.errors import UserError

        raise UserError(f"Ray address {address} is a dashboard, which `raygen submit` / `raygen jobs` talk to; "
                        "to run there use `raygen submit -- <command>`, or unset RAY_ADDRESS to run here")
    from raygen import console

    # Quiet (the default on the command line): the workers' output stays in the session's log files.
    common = dict(logging_level=logging.WARNING, log_to_driver=not console.is_quiet())
    if address:
        ray.init(address=address, **common)
    else:
        # With the dashboard on: Ray Train's PlacementGroupCleaner (a detached actor) frees a
        # run's worker placement group when its controller dies without doing so itself (a
        # sweep trial that ASHA stops), and it learns of the death through the State API, which
        # the dashboard serves. Without it every stopped trial keeps its workers' CPUs and the
        # next trials wait forever. The API address is pinned for this instance's processes,
        # which inherit the environment ray.init starts them with (found by itself it is
        # ambiguous once another Ray instance runs on the machine), and only for them: a later
        # child of this process may belong to another cluster.
        port = free_port()
        before = os.environ.get(API_SERVER_VAR)
        os.environ[API_SERVER_VAR] = f"http://127.0.0.1:{port}"
        try:
            ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                     dashboard_port=port, **common)
        finally:
            if before is None:
                del os.environ[API_SERVER_VAR]
            else:
                os.environ[API_SERVER_VAR] = before


API_SERVER_VAR = "RAY_API_SERVER_ADDRESS"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_worker_errors() -> None:
    """Ray Data logs a worker-side exception's stack before re-raising it on the driver.

    A DataError already names the bad input in one line, so outside --debug those logs are
    noise around it.
    """
    for name in ("ray.data.exceptions", "ray.data._internal.execution.streaming_executor_state"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))
