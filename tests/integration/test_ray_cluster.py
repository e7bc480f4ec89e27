"""Joining a real multi-node Ray cluster by ``ray.address``: a head and a second node, each its own set of
processes on 127.0.0.1. The cache engine runs on it; training runs one worker on each node, loses the
second node after a checkpoint, and finishes every step from that checkpoint once a node is back; neither
job starts a cluster of its own nor stops the one it joined. The storage every node shares is a local
folder (all nodes are on this machine)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from mpe.training.checkpoint import newest_intact
from tests.project_config import copy_project, has_intact_checkpoint, local_cluster_dir

BIN = Path(sys.executable).parent
NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 100 * 2**20}


def _add_node(cluster, **args):
    from mpe.runtime.ray_cluster import local_node_env

    with local_node_env():  # the node's processes inherit a HOME that keeps Ray off cloud metadata
        return cluster.add_node(**NODE, **args)


def _processes_under(folder: str) -> list[int]:
    """Processes whose command line names ``folder`` (every process of a node names its session folder)."""
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if folder.encode() in (d / "cmdline").read_bytes():
                out.append(int(d.name))
        except OSError:
            continue
    return out


@pytest.fixture(scope="module")
def cluster():
    """A head and one more node, one CPU each; every process is stopped, and checked gone, at the end."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # this process must not stay a driver of another test's local cluster
    # A local `ray.init` earlier in this process switched token auth on in its environment (Ray's default
    # for new local clusters); this cluster, its nodes and the jobs that join it agree on it explicitly.
    from ray._raylet import Config

    env = pytest.MonkeyPatch()
    env.setenv("RAY_AUTH_MODE", "disabled")
    Config.initialize("")  # Ray caches the mode it read: read it again
    temp_dir = tempfile.mkdtemp(prefix="mpe-rc-")  # short: Ray's socket paths must fit in 107 bytes
    c = Cluster()
    try:
        # A killed node is declared dead after 4 missed health checks 0.5 s apart (Ray's default: 15 s).
        _add_node(
            c,
            include_dashboard=False,
            temp_dir=temp_dir,
            _system_config={"health_check_period_ms": 500, "health_check_failure_threshold": 4},
        )
        _add_node(c)
        c.wait_for_nodes(timeout=60)
        yield c
    finally:
        c.shutdown()
        deadline = time.monotonic() + 30
        while _processes_under(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _processes_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        env.undo()
        Config.initialize("")
        assert not left, f"Ray processes left after the cluster's shutdown: {left}"


def _mpe(params: Path, *args, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "mpe"), "--params", str(params), *args],
        cwd=params.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def _still_whole_and_alone(cluster, project_dir: Path) -> None:
    """The joined cluster is still up with all its nodes, every one on loopback, and the job started no
    local cluster of its own (no folder of one, no process carrying its marker)."""
    from mpe.runtime.ray_cluster import _processes

    cluster.wait_for_nodes(timeout=60)
    assert cluster.remaining_processes_alive()
    nodes = [n for n in cluster.global_state.node_table() if n["Alive"]]
    assert len(nodes) == 1 + len(cluster.worker_nodes)
    assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
    own = local_cluster_dir(project_dir)
    assert not Path(own).exists() and not [p for p, (_, marked) in _processes(own).items() if marked]


def test_the_ray_cache_engine_joins_the_cluster_and_writes_the_local_engine_s_shards(project, cluster, tmp_path):
    from mpe.cache.compute import cache_fields
    from mpe.cache.store import ShardReader, open_active
    from mpe.config import load_params
    from mpe.files import storage

    root, local_params = project
    params = copy_project(project, tmp_path, ray={"address": cluster.address}, cache={"engine": "ray"})
    shutil.rmtree(tmp_path / "cache")
    proc = _mpe(params, "cache")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    shards = storage.list_files(storage.join(local_params.data.out_dir, "shards", "train"), ".tar")
    assert json.loads((tmp_path / "metrics" / "cache.json").read_text())["shards_computed"] == len(shards)
    mine = load_params(params)
    fields = cache_fields(Path(mine.base_model.out_dir), mine.model.text, mine.cache.dtype)
    local, remote = open_active(local_params.cache.root, fields), open_active(mine.cache.root, fields)
    for shard in shards:
        a, b = ShardReader(local.shard_url("train", shard)), ShardReader(remote.shard_url("train", shard))
        assert a.keys == b.keys and torch.equal(a.row_offsets, b.row_offsets)
        assert torch.allclose(a.rows(0), b.rows(0), rtol=2e-3, atol=2e-3)
    _still_whole_and_alone(cluster, tmp_path)


def test_training_on_two_nodes_loses_one_and_resumes_from_its_last_checkpoint(project, cluster, tmp_path):
    steps, every = 12, 2
    params = copy_project(
        project,
        tmp_path,
        ray={"address": cluster.address},
        train={
            "max_steps": steps,
            "checkpoint_every": every,
            "num_workers": 2,
            "loader_workers": 0,
            "threads_per_worker": 1,
        },
    )
    results = tmp_path / "ray_results"
    # Two workers of one CPU each on two nodes of one CPU each: one worker per node.
    assert cluster.global_state.cluster_resources()["CPU"] == 2
    proc = _mpe(params, "train")
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not has_intact_checkpoint(results):
            time.sleep(0.2)
        assert has_intact_checkpoint(results), "no intact checkpoint before the deadline"
        run_dir = next(d for d in results.glob("*") if d.is_dir())
        last_before_loss = newest_intact(run_dir)[1][2]["step"]
        cluster.remove_node(next(iter(cluster.worker_nodes)), allow_graceful=False)  # the node's processes, kill -9
        cluster.wait_for_nodes(timeout=60)  # until Ray has declared it dead: the head alone is left
        # The fixed num_workers does not fit on the one CPU left: Ray Train waits for capacity.
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        _add_node(cluster)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads((tmp_path / "metrics" / "train.json").read_text())
    history = json.loads((tmp_path / "metrics" / "train_history.json").read_text())
    assert summary["steps"] == steps and [r["step"] for r in history] == list(range(1, steps + 1))
    restored = summary["restored_from_step"]
    assert restored is not None, "the node loss did not interrupt the run"
    assert restored % every == 0 and last_before_loss <= restored < steps, (restored, last_before_loss)
    assert newest_intact(run_dir)[1][2]["step"] == steps
    _still_whole_and_alone(cluster, tmp_path)
