"""Scheduled retraining on growing data: a folder of LAION-style parquet parts whose URLs a 127.0.0.1 HTTP
server answers; the whole flow (`mpe run`) runs, a part is added, and the next run downloads and caches
only that part, trains (train.init_from's default, scratch), evaluates and goes through the gate."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from mpe.files.verified import RECORD
from tests.e2e.project import BIN, make_project, pipeline_params, project_env, run
from tests.http_images import ImageServer

pytestmark = pytest.mark.slow

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
    "white": (240, 240, 240),
    "black": (15, 15, 15),
}
FRACTION = 0.15


def _part(srv: ImageServer, folder: Path, name: str, n: int) -> dict[str, str]:
    """A LAION-style part of ``n`` rows (URL, TEXT, WIDTH, HEIGHT, similarity, punsafe, pwatermark); its
    last row fails data.filters.min_similarity. Returns the served paths of the rows the filter keeps."""
    rows, kept = [], {}
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        path = f"/{name}/{i}.png"
        url = srv.add_image(path, tuple((c + 7 * i) % 256 for c in COLOURS[colour]), size=(40 + i % 5, 36))
        sim = 0.1 if i == n - 1 else 0.3
        rows.append(
            {
                "URL": url,
                "TEXT": f"a {colour} picture number {i} of {name}",
                "WIDTH": 40 + i % 5,
                "HEIGHT": 36,
                "similarity": sim,
                "punsafe": 0.01,
                "pwatermark": 0.05,
            }
        )
        if sim >= 0.2:
            kept[path] = url
    pd.DataFrame(rows).to_parquet(folder / f"{name}.parquet", index=False)
    return kept


def _expected_test_urls(urls: list[str]) -> set[str]:
    """The evaluation rows of one part, computed here from the URL's sha256 (the documented rule)."""
    frac = {u: int.from_bytes(hashlib.sha256(u.encode()).digest()[:8], "big") / 2.0**64 for u in urls}
    chosen = {u for u, f in frac.items() if f < FRACTION}
    return chosen or {min(frac, key=frac.get)}


def _files(folder: Path) -> dict[str, tuple[str, int, int]]:
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_ino, p.stat().st_mtime_ns)
        for p in folder.iterdir()
        if p.is_file() and p.name != RECORD  # this machine's verification record: rewritten, not data
    }


def _lock_outs(proj: Path) -> dict[str, dict]:
    lock = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
    return {o["path"]: o for stage in lock.values() for o in stage.get("outs", [])}


def _test_urls(proj: Path) -> set[str]:
    return {u for f in (proj / "data" / "url_lists" / "test").glob("*.parquet") for u in pd.read_parquet(f)["URL"]}


def _json(proj: Path, name: str) -> dict:
    return json.loads((proj / "metrics" / name).read_text())


def test_a_new_part_is_downloaded_cached_trained_and_gated_alone(tmp_path, tiny_base_dir):
    params = pipeline_params(
        tiny_base_dir, model_name="mpe-growing", max_steps=4, batch_size=8, checkpoint_every=4, num_workers=1
    )
    params["data"].update(
        source="url_list",
        url_list="laion",
        test_fraction=FRACTION,
        samples_per_shard=8,
        threads=4,
        timeout=5,
        min_success_rate=0.95,
    )
    params["data"]["filters"]["min_similarity"] = 0.2
    proj = make_project(tmp_path / "proj", params)[0]
    env = project_env(proj)
    env.pop("PREFECT_API_URL", None)  # `mpe run` starts its own Prefect server, as the schedule's run does
    (proj / "laion").mkdir()
    with ImageServer() as srv:
        first = _part(srv, proj / "laion", "part-00000", 25)
        run([str(BIN / "mpe"), "run"], proj, env, timeout=900)
        assert set(srv.counts) == set(first) and set(srv.counts.values()) == {1}
        reg1 = _json(proj, "register.json")
        assert reg1["version"] == "1" and reg1["alias"] == "champion"
        train_shards = _files(proj / "data" / "shards" / "train")
        test_shards = _files(proj / "data" / "shards" / "test")
        cache1 = _json(proj, "cache.json")
        cache_dir = Path(proj / cache1["folder"]) / "train"
        cache_files = _files(cache_dir)
        lock1, tests1, train1 = _lock_outs(proj), _test_urls(proj), _json(proj, "train.json")
        assert tests1 == _expected_test_urls(list(first.values()))

        srv.counts.clear()
        second = _part(srv, proj / "laion", "part-00001", 13)  # the new part appears before the next run
        run([str(BIN / "mpe"), "run"], proj, env, timeout=900)
        # downloaded: only the new part's URLs, each once
        assert set(srv.counts) == set(second) and set(srv.counts.values()) == {1}

    data = _json(proj, "data.json")
    assert data["parts"] == {
        "part-00000": {"train": "kept", "test": "kept"},
        "part-00001": {"train": "downloaded", "test": "downloaded"},
    }
    for folder, before in (("train", train_shards), ("test", test_shards)):
        now = _files(proj / "data" / "shards" / folder)
        assert {k: v[0] for k, v in now.items() if k in before} == {k: v[0] for k, v in before.items()}  # bytes
        assert set(now) > set(before) and all(n.startswith("part-00001") for n in set(now) - set(before))

    # cached: only the new part's shards; the old cache shard files untouched (bytes, inode, mtime)
    cache2 = _json(proj, "cache.json")
    new_train = sorted(
        n for n in set(_files(proj / "data" / "shards" / "train")) - set(train_shards) if n.endswith(".tar")
    )
    assert cache2["folder"] == cache1["folder"] and cache2["computed_shards"] == new_train
    assert cache2["shards_computed"] == len(new_train) and cache2["shards_reused"] == cache1["data_shards"]
    now = _files(cache_dir)
    assert {k: now[k] for k in cache_files} == cache_files
    assert sorted(set(now) - set(cache_files)) == [n.replace(".tar", ".safetensors") for n in new_train]

    # DVC's lock: data and cache changed (new hashes, more files), the base model did not
    lock2 = _lock_outs(proj)
    for out in ("data", "cache"):
        assert lock2[out]["md5"] != lock1[out]["md5"] and lock2[out]["nfiles"] > lock1[out]["nfiles"], out
    # the new train shards, and one texts shard: the grown test split brings captions of its own
    assert lock2["cache"]["nfiles"] - lock1["cache"]["nfiles"] == len(new_train) + 1
    assert lock2["models/base"] == lock1["models/base"]

    # the test split: every earlier row keeps its split; the new part adds exactly its hash-chosen rows
    tests2 = _test_urls(proj)
    assert tests2 == tests1 | _expected_test_urls(list(second.values()))

    # trained again, from scratch (the default), on the grown data, and gated
    train2 = _json(proj, "train.json")
    assert train2["start"] == {"init_from": "scratch"} and train2["steps"] == 4
    assert train2["ray_run_name"] != train1["ray_run_name"] and train2["train_samples"] > train1["train_samples"]
    reg2 = _json(proj, "register.json")
    assert reg2["version"] == "2" and reg2["alias"] in ("champion", "challenger") and not reg2.get("skipped")
    assert reg2["champion_score"] is not None  # the champion re-measured on the grown test set
    mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlruns.db'}")
    tags = mlflow.MlflowClient().get_model_version("mpe-growing", "2").tags
    assert tags["gate.decision"] == reg2["reason"] and tags["dvc.data"] == lock2["data"]["md5"]
    recorded = subprocess.run(
        ["git", "show", "mpe/runs:metrics/sources.json"], cwd=proj, capture_output=True, text=True, check=True
    ).stdout
    assert set(json.loads(recorded)["parts"]) == {"part-00000", "part-00001"}
