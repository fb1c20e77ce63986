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
    common = dict(logging_level=logging.WARNING, log_to_driver=True)
    if address:
        ray.init(address=address, **common)
    else:
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, **common)


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
