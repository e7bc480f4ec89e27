"""Starting or joining a Ray cluster with nothing leaving the machine by default."""

from __future__ import annotations

import os


def ensure_ray(cfg) -> None:
    """``ray.init`` once: a local cluster bound to 127.0.0.1 (no dashboard, no usage stats), or the
    cluster at ``ray.address`` (``auto``, ``ray://host:10001``)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if cfg.address:
        ray.init(address=cfg.address, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=True, configure_logging=False)
