"""Starting or joining a Ray cluster, with nothing leaving the machine when it is local.

Ray's habits that reach outside a laptop even with usage stats off are switched off here:
- the dashboard process's usage module probes cloud metadata endpoints (169.254.169.254,
  metadata.google.internal) unless ``~/ray_bootstrap_config.yaml`` names a provider: the local
  cluster's processes get a HOME of their own that holds one (``provider: local``). A cluster joined
  by ``ray.address`` was started by someone else, with their HOME: nothing of ours applies to it
  (nodes that mpe's tests start get it from :func:`local_node_env`, with no usage report either);
- torch's TCP rendezvous reverse-resolves ``::ffff:127.0.0.1`` through DNS: when every node is on this
  machine (the local cluster, or a joined one whose nodes are all on loopback) the process group meets
  through a file store instead (:class:`FileStoreTorchConfig`).

What the local cluster does to the machine (loopback, its HOME, stopping a killed run's orphans) is
done only for the local cluster: joining a cluster by address starts nothing and stops nothing.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mpe.files.storage import mpe_home

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def is_local(cfg) -> bool:
    return not cfg.address and "RAY_ADDRESS" not in os.environ


def prefer_loopback(cfg) -> None:
    """For a local cluster make every Ray process use 127.0.0.1.

    Ray reads this switch when it is first imported, so callers run this before importing ray; the
    CLI does it for every command. Left alone when an address (a real cluster) is configured.
    """
    if is_local(cfg):
        os.environ.setdefault(LOOPBACK_ENV, "0")


def local_ray_home() -> Path:
    """A HOME whose ``ray_bootstrap_config.yaml`` names a local provider (no cloud probes)."""
    home = Path(tempfile.gettempdir()) / f"mpe-ray-home-{os.getuid()}"
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "ray_bootstrap_config.yaml"
    if not cfg.exists():
        cfg.write_text(
            "# written by mpe: a local cluster, so Ray does not probe cloud metadata\nprovider:\n  type: local\n"
        )
    return home


# Even with usage stats off, the head of a cluster that ray.init did not start sends one "disabled" report
# to usage-stats.ray.io (a DNS lookup at least): for nodes started here it goes to a closed loopback port.
NO_REPORT_URL = "http://127.0.0.1:9/"


@contextmanager
def local_node_env():
    """While Ray nodes are started on this machine: the HOME of :func:`local_ray_home` and a loopback usage
    report URL, which their processes inherit (``MPE_HOME`` keeps what the user's HOME says); both are
    restored after."""
    os.environ.setdefault("MPE_HOME", str(mpe_home()))
    with _environ(HOME=str(local_ray_home()), RAY_USAGE_STATS_REPORT_URL=NO_REPORT_URL):
        yield


def local_temp_dir() -> str:
    """Ray's folder for this project's local cluster: its processes carry it on their command line."""
    tag = hashlib.sha256(str(Path.cwd().resolve()).encode()).hexdigest()[:8]
    return str(Path(tempfile.gettempdir()) / f"mpe-ray-{os.getuid()}-{tag}")


MARKER = "MPE_RAY_LOCAL_CLUSTER"
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
LOCAL_TRAIN_POLL_S = "0.2"
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def _processes(marker: str) -> dict[int, tuple[int, bool]]:
    """``{pid: (parent pid, carries the marker)}`` of every process we can see; the marker is an environment
    variable every process of our local cluster inherits (Ray renames its agents, so their command lines
    do not say whose they are)."""
    out = {}
    needle = f"{MARKER}={marker}".encode() + b"\0"
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            try:
                marked = needle in (d / "environ").read_bytes() + b"\0"
            except OSError:
                marked = False
            out[int(d.name)] = (ppid, marked)
        except (OSError, ValueError, IndexError):
            continue
    return out


def stop_orphans(marker: str) -> int:
    """Kill what is left of a local cluster whose driver was killed: processes of the cluster ``marker`` whose
    parent is gone (reparented to init), with everything below them. A live run's processes keep their
    driver as parent and are left alone. Returns how many were killed."""
    import signal

    procs = _processes(marker)
    orphans = [
        pid
        for pid, (ppid, marked) in procs.items()
        if marked and pid != os.getpid() and (ppid == 1 or ppid not in procs)
    ]
    doomed, todo = set(orphans), list(orphans)
    while todo:
        parent = todo.pop()
        for pid, (ppid, _) in procs.items():
            if ppid == parent and pid not in doomed:
                doomed.add(pid)
                todo.append(pid)
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(doomed)


def ensure_ray(cfg) -> None:
    """``ray.init`` once: a local cluster on 127.0.0.1 (no dashboard UI, no usage stats, no cloud
    probes), or the cluster at ``ray.address`` (``auto``, ``ray://host:10001``)."""
    prefer_loopback(cfg)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return
    if not is_local(cfg):
        ray.init(address=cfg.address, log_to_driver=True)
        return
    temp_dir = local_temp_dir()
    stop_orphans(temp_dir)
    # Ray Train's controller takes a worker's report (and its checkpoint) only when it polls the workers,
    # every 2 s by default, and the worker blocks until it does: on a small model that is most of a
    # checkpointing step. Polling a local cluster's few workers more often costs next to nothing.
    os.environ.setdefault(TRAIN_POLL_ENV, LOCAL_TRAIN_POLL_S)
    # Ray Train's preemption watcher is an actor of its own (a process, ~1 CPU-second to start) that polls Ray
    # Core for nodes an autoscaler is draining: a local cluster's one node is this machine, never drained.
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    os.environ[MARKER] = temp_dir  # inherited by every process of the cluster: how a later run finds orphans
    # Where this cluster's own processes look for "the" local cluster when they are not told: Ray Train's
    # placement-group cleaner asks the state API with no address, which scans the machine for Ray clusters
    # and fails ("Found multiple active Ray instances") when another one runs beside ours.
    own_tmp = Path(temp_dir) / "tmp"
    with local_node_env(), _environ(RAY_TMPDIR=str(own_tmp)):
        # Without the dashboard there is no state API, and Ray Train's placement-group cleaner warns
        # about that every second; Ray's own logs are kept to errors on the local cluster.
        ray.init(
            address="local",  # a new cluster of our own, never one that happens to run on the machine
            num_cpus=cfg.num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            configure_logging=False,
            _temp_dir=temp_dir,
            logging_config=ray.LoggingConfig(encoding="TEXT", log_level="ERROR"),
        )
    address_file = own_tmp / "ray" / "ray_current_cluster"  # what `ray start` writes; ray.init does not
    address_file.parent.mkdir(parents=True, exist_ok=True)
    address_file.write_text(ray.get_runtime_context().gcs_address)


@contextmanager
def _environ(**values: str):
    """``values`` in this process's environment for the block (what processes started in it inherit)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def torch_config(cfg, use_gpu: bool, store_dir: Path):
    """The TorchTrainer backend config: a file-store rendezvous when every node is on this machine, TCP
    across machines."""
    from ray.train.torch import TorchConfig

    backend = "nccl" if use_gpu else "gloo"
    if is_local(cfg) or _all_nodes_on_loopback():
        store_dir.mkdir(parents=True, exist_ok=True)
        return _file_store_config_cls()(backend=backend, store_dir=str(store_dir))
    return TorchConfig(backend=backend)


LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def _all_nodes_on_loopback() -> bool:
    """Whether every live node of the joined cluster is on this machine (their workers all see the
    rendezvous folder, and TCP would cost a DNS lookup)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return bool(nodes) and all(n.get("NodeManagerAddress") in LOOPBACK for n in nodes)


def _file_store_config_cls():
    import ray
    from ray.train.torch.config import (
        TorchConfig,
        _set_torch_distributed_env_vars,
        _setup_torch_process_group,
        _TorchBackend,
    )

    class _FileStoreBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            store = Path(backend_config.store_dir) / f"torch-store-{uuid.uuid4().hex}"
            worker_group.execute(_set_torch_distributed_env_vars)
            ray.get(
                [
                    worker_group.execute_single_async(
                        i,
                        _setup_torch_process_group,
                        backend=backend_config.backend,
                        world_rank=i,
                        world_size=len(worker_group),
                        init_method=store.as_uri(),
                        timeout_s=backend_config.timeout_s,
                    )
                    for i in range(len(worker_group))
                ]
            )

    @dataclass
    class FileStoreTorchConfig(TorchConfig):
        store_dir: str = ""

        @property
        def backend_cls(self):
            return _FileStoreBackend

    return FileStoreTorchConfig
