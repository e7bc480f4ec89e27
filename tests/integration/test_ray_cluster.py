"""Joining a real multi-node Ray cluster by ``ray.address``: a head and a second node, each its own set of
processes on 127.0.0.1. The cache engine runs on it; training runs one worker on each node, loses the
second node after a checkpoint, and finishes every step from that checkpoint once a node is back; the data
stage's download (img2dataset's Ray distributor) writes the multiprocessing distributor's very shards, and
survives losing a node mid-download: the lost shard is fetched again whole. No job starts a cluster of its
own or stops the one it joined. The storage every node shares is a local folder (all nodes are on this
machine)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from mpe.training.checkpoint import newest_intact
from tests.http_images import ImageServer
from tests.project_config import copy_project, has_intact_checkpoint, local_cluster_dir, small_params

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


def _download_params(root: Path, url_list: Path, **data) -> Path:
    """A project whose data stage downloads ``url_list`` (the other stages are not run)."""
    p = small_params(
        root,
        root / "unused-base",
        data={"source": "url_list", "url_list": str(url_list), "samples_per_shard": 4, "timeout": 60, **data},
    )
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def _served_list(srv: ImageServer, folder: Path, n: int) -> Path:
    urls = [srv.add_image(f"/r/{i}.png", (5 * i, 250 - 5 * i, 90 + 3 * i)) for i in range(n)]
    folder.mkdir(parents=True)
    pd.DataFrame({"URL": urls, "TEXT": [f"image {i}" for i in range(n)]}).to_parquet(folder / "part.parquet")
    return folder / "part.parquet"


def _shards(data: Path) -> dict[str, tuple[bytes, list]]:
    """Every shard of every split: its tar's bytes, and its parquet's keys, captions and statuses."""
    out = {}
    for tar in sorted(data.glob("shards/*/*.tar")):
        rows = pd.read_parquet(tar.with_suffix(".parquet"))
        out[str(tar.relative_to(data))] = (tar.read_bytes(), rows[["key", "caption", "status"]].values.tolist())
    return out


def _reference(srv: ImageServer, url_list: Path, root: Path) -> dict:
    """The multiprocessing distributor's shards of the same list (img2dataset's default distributor)."""
    from mpe.config import load_params
    from mpe.data.prepare import prepare_data

    prepare_data(load_params(_download_params(root, url_list)).data, 0)
    return _shards(root / "data")


def test_the_ray_distributor_downloads_the_multiprocessing_distributor_s_shards(cluster, tmp_path):
    with ImageServer() as srv:
        url_list = _served_list(srv, tmp_path / "lists", 22)
        want = _reference(srv, url_list, tmp_path / "mp")
        fetched = sum(srv.counts.values())
        params = _download_params(tmp_path / "ray", url_list, distributor="ray")
        with open(params) as f:
            p = yaml.safe_load(f)
        p["ray"] = {"address": cluster.address}
        params.write_text(yaml.safe_dump(p))
        proc = _mpe(params, "data")
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
        assert sum(srv.counts.values()) == 2 * fetched  # every image fetched once more, by the Ray tasks
    got = _shards(tmp_path / "ray" / "data")
    assert len(got) >= 6 and got.keys() == want.keys()
    for name in want:  # the same keys, captions and statuses, and the same bytes
        assert got[name][1] == want[name][1], name
        assert got[name][0] == want[name][0], name
    _still_whole_and_alone(cluster, tmp_path / "ray")


def test_a_node_lost_mid_download_costs_its_shard_fetched_again_and_nothing_else(cluster, tmp_path):
    """img2dataset's Ray distributor makes each shard one Ray task and leaves failures to Ray: a task whose
    node dies is retried (Ray's default, 3 retries for a system failure) from the start of its shard, on a
    node that is left; the shard's partial tar is rewritten, and shards already finished are kept."""
    n = 22
    with ImageServer() as srv:
        url_list = _served_list(srv, tmp_path / "lists", n)
        want = _reference(srv, url_list, tmp_path / "mp")
        srv.counts.clear()
        srv.gated = {f"/r/{i}.png" for i in range(n)}  # every download waits at the server until it opens
        params = _download_params(tmp_path / "ray", url_list, distributor="ray", threads=4)
        p = yaml.safe_load(params.read_text())
        p["ray"] = {"address": cluster.address}
        params.write_text(yaml.safe_dump(p))
        proc = _mpe(params, "data")
        try:
            # one CPU per node: two shards in flight, one on each node, each asking for its 4 rows at once
            deadline = time.monotonic() + 240
            while len(srv.counts) < 8:
                assert proc.poll() is None, proc.communicate()[0][-3000:]
                assert time.monotonic() < deadline, "no two shards in flight"
                time.sleep(0.1)
            cluster.remove_node(next(iter(cluster.worker_nodes)), allow_graceful=False)
            cluster.wait_for_nodes(timeout=60)  # the node is declared dead: the head alone is left
            srv.gate.set()
            out, _ = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        counts = dict(srv.counts)
    _add_node(cluster)  # the module's cluster whole again
    assert proc.returncode == 0, out[-3000:]
    got = _shards(tmp_path / "ray" / "data")
    assert got.keys() == want.keys() and all(got[k] == want[k] for k in want)
    twice = {srv.url + path for path, c in counts.items() if c == 2}
    shards = [set(pd.read_parquet(f)["url"]) for f in (tmp_path / "mp" / "data" / "shards" / "train").glob("*.parquet")]
    # exactly the rows of one shard were fetched again (the lost task's), every other row once
    assert twice in shards, (sorted(twice), counts)
    assert all(c in (1, 2) for c in counts.values()) and len(counts) == n
    _still_whole_and_alone(cluster, tmp_path / "ray")
