"""Joining a Ray cluster from the API process."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def connect(address: str) -> None:
    """`auto`: the cluster this machine belongs to (`ray start --head` ran here);
    `local`: start a private one-machine cluster; else `host:port` (or `ray://…`)."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=None if address == "local" else address, namespace="aicloud",
             log_to_driver=False, include_dashboard=False, configure_logging=False)
    resources = ray.cluster_resources()
    log.info("joined Ray cluster at %s: %s CPUs, %s GPUs on %d nodes", address,
             resources.get("CPU", 0), resources.get("GPU", 0), len(ray.nodes()))
