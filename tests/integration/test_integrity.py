"""Nothing stale, nothing corrupt, nothing mixed: faults of lineage and integrity injected for real on copies
of the session project — a schedule edited after a finished run, bytes overwritten in place in a cache shard
and in a data shard, a non-finite loss, ranks that would choose their precision apart, model folders
replaced in place under the same path, and warm starts from the registry's champion."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from mpe.config import load_params
from tests.project_config import (
    assert_one_line_error,
    copy_project,
    replace_weights_in_place,
    run_mpe,
    write_tiny_siglip,
)

BIN = Path(sys.executable).parent


def _edit(params: Path, **sections) -> Path:
    p = yaml.safe_load(params.read_text())
    for section, values in sections.items():
        p[section] = {**p.get(section, {}), **values}
    params.write_text(yaml.safe_dump(p))
    return params


def _overwrite(path: Path, at: int, n: int, seed: int = 0) -> None:
    """``n`` random bytes written over ``path`` at ``at``: the file keeps its size."""
    import random

    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(random.Random(seed).randbytes(n))
    assert path.stat().st_size == size


def _train(params: Path) -> dict:
    from mpe.stages import train

    return train.run(load_params(params))


# -- lineage: which run a training belongs to -----------------------------------------------------------
def test_a_changed_schedule_is_a_new_run_and_a_changed_cadence_resumes(project, tmp_path, ray_session):
    params = copy_project(project, tmp_path, train={"max_steps": None, "epochs": 2, "checkpoint_every": 3})
    first = _train(params)
    assert first["steps"] == first["total_steps"]
    _edit(params, train={"epochs": 1})  # the finished run's schedule was for twice the steps
    second = _train(params)
    assert second["ray_run_name"] != first["ray_run_name"]
    assert second["restored_from_step"] is None
    assert second["steps"] == second["total_steps"] == first["total_steps"] // 2
    _edit(params, train={"checkpoint_every": 1, "log_every": 2, "keep_checkpoints": 3})  # what is kept, not computed
    third = _train(params)
    assert third["ray_run_name"] == second["ray_run_name"]
    assert third["restored_from_step"] == third["steps"] == second["steps"]


def test_every_rank_trains_in_the_precision_the_driver_chose(project, tmp_path, ray_session, monkeypatch):
    """The driver's probe is made to answer the opposite of this machine's: ranks that probed for themselves
    would train in the machine's precision; ranks told by the driver train in the driver's."""
    from mpe.runtime import precision
    from mpe.training.checkpoint import newest_intact

    machine = "bfloat16" if precision.cpu_bf16_speedup() >= 1.3 else "float32"
    told = "float32" if machine == "bfloat16" else "bfloat16"
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 100.0 if told == "bfloat16" else 0.01)
    params = copy_project(project, tmp_path, train={"max_steps": 2, "checkpoint_every": 2, "num_workers": 2})
    summary = _train(params)
    assert summary["compute_dtype"] == told
    run_dir = tmp_path / "ray_results" / summary["ray_run_name"]
    assert newest_intact(run_dir)[1][2]["compute_dtype"] == told  # what the ranks recorded in their checkpoint


# -- corrupt inputs: refused, named, repaired -------------------------------------------------------------
def test_a_cache_shard_overwritten_in_place_is_refused_and_recomputed(project, tmp_path):
    import torch

    from mpe.cache.store import ShardReader

    params = copy_project(project, tmp_path)
    shard = sorted((tmp_path / "cache").glob("*/train/*.safetensors"))[1]
    original = shard.read_bytes()
    (tmp_path / "original.safetensors").write_bytes(original)
    _overwrite(shard, len(original) // 3, len(original) // 4)  # inside the states, the same size
    assert_one_line_error(run_mpe(params, "train"), shard.name, "`mpe cache` recomputes it")
    assert not (tmp_path / "models" / "trained").exists()
    run = run_mpe(params, "cache")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "metrics" / "cache.json").read_text())
    assert summary["damaged_shards"] == [shard.name] and summary["shards_computed"] == 1
    assert summary["computed_shards"] == [shard.stem + ".tar"]
    with ShardReader(str(shard)) as now, ShardReader(str(tmp_path / "original.safetensors")) as before:
        now.verify()
        assert now.keys == before.keys and now.num_texts == before.num_texts
        assert all(torch.allclose(now.rows(u), before.rows(u), atol=2e-3) for u in range(now.num_texts))


def test_a_data_shard_overwritten_in_place_at_the_same_size_is_refused(project, tmp_path, monkeypatch):
    from mpe.data.stats import verified_shards
    from mpe.files import storage

    params = copy_project(project, tmp_path)
    data_root = tmp_path / "data"
    hashed = []
    real_sha256 = storage.sha256
    monkeypatch.setattr(storage, "sha256", lambda url, *a: hashed.append(url) or real_sha256(url, *a))
    shards, _ = verified_shards(data_root, "train")
    assert len(hashed) == len(shards)  # a copy: new inodes, every shard read once ...
    hashed.clear()
    verified_shards(data_root, "train")
    assert hashed == []  # ... and not again while the files are as they were
    shard = Path(shards[1])
    _overwrite(shard, shard.stat().st_size // 2, 2 << 10)
    with pytest.raises(Exception, match=shard.name):
        verified_shards(data_root, "train")
    assert hashed == [str(shard)]  # the changed file alone is read
    assert_one_line_error(run_mpe(params, "train"), shard.name, "sha256", "mpe data")
    assert_one_line_error(run_mpe(params, "cache"), shard.name, "sha256")


def test_a_non_finite_loss_stops_training_naming_the_step_the_rank_and_the_samples(project, tmp_path, ray_session):
    """A cache shard whose states for one caption are NaN, with checksums that match (a trunk that
    overflowed, stored in bfloat16): training stops at the first step that reads them, and nothing is
    exported."""
    import torch

    from mpe.cache.compute import open_cache
    from mpe.cache.store import STORAGE, ShardReader, ShardWriter
    from mpe.errors import MpeError

    params = copy_project(project, tmp_path)
    p = load_params(params)
    folder = open_cache(p.cache.root, Path(p.base_model.out_dir), p.model.text, p.cache.dtype)
    shard = sorted(Path(folder.url, "train").glob("*.safetensors"))[0]
    with ShardReader(str(shard)) as r:
        sample_text, keys = r.sample_text.tolist(), r.keys
    poisoned = {k for k, u in zip(keys, sample_text) if u == 0}
    for other in sorted(Path(folder.url, "train").glob("*.safetensors")):  # all in bfloat16: batches mix shards
        with ShardReader(str(other)) as r:
            rows = [r.rows(u) for u in range(r.num_texts)]
            lens = r.caption_lens.tolist()
            shas = [bytes(r.text_sha256[u].tolist()) for u in range(r.num_texts)]
            sample_text, meta = r.sample_text.tolist(), dict(r.metadata)
        seg = rows[0].shape[0] - lens[0]
        writer = ShardWriter(other, STORAGE["bfloat16"], rows[0].shape[1], lens, seg, shas, sample_text, meta)
        for u, states in enumerate(rows):
            writer.write_caption(u, torch.full_like(states, float("nan")) if (other, u) == (shard, 0) else states)
        writer.close()
    with pytest.raises(MpeError, match=r"step \d+: the loss is not finite on rank \d") as err:
        _train(params)
    assert any(k in str(err.value) for k in poisoned), str(err.value)
    assert "nothing was exported" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "models" / "trained").exists()
    assert not (tmp_path / "metrics" / "train.json").exists()


# -- model folders: tracked by content ------------------------------------------------------------------
def test_a_model_folder_replaced_in_place_reruns_the_stages_it_feeds(project, tmp_path, tiny_base_dir):
    """A local base LLM and a pretrained vision tower, each replaced by other weights under the same path:
    DVC sees both (through the sources stage), and the train stage starts a new Ray run."""
    from mpe.config import Params
    from tests.e2e.project import COPY, REPO, git, project_env
    from tests.e2e.project import run as run_ok

    root, _ = project
    llm = tmp_path / "llm"
    shutil.copytree(tiny_base_dir, llm)
    vision = write_tiny_siglip(tmp_path / "siglip")
    proj = tmp_path / "proj"
    proj.mkdir()
    params = copy_project(
        project,
        proj,
        base_model={"name": str(llm)},
        model={"vision": {"pretrained": str(vision)}},
        train={"max_steps": 2, "checkpoint_every": 2},
    )
    full = Params.model_validate(yaml.safe_load(params.read_text())).model_dump(mode="json", by_alias=True)
    params.write_text(yaml.safe_dump(full))  # every key: DVC checks that the keys dvc.yaml names exist
    for item in COPY:
        src, dst = REPO / item, proj / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir() else shutil.copy2(
            src, dst
        )
    shutil.copytree(root / "metrics", proj / "metrics")  # the session project's data and cache summaries
    git(proj, "init", "-q")
    git(proj, "add", "-A")
    git(proj, "commit", "-qm", "project")
    env = project_env(proj)
    run_ok(["dvc", "repro", "sources"], proj, env)
    run_ok(["dvc", "commit", "-f", "data", "base_model", "cache"], proj, env)  # what the session project ran
    run_ok(["dvc", "repro", "train"], proj, env)
    first = json.loads((proj / "metrics" / "train.json").read_text())
    status = json.loads(run_ok(["dvc", "status", "--json"], proj, env))
    assert "base_model" not in status and "train" not in status, status

    replace_weights_in_place(llm, seed=1)
    replace_weights_in_place(vision, seed=2)
    run_ok(["dvc", "repro", "sources"], proj, env)  # what `mpe run` does first, every time
    status = json.loads(run_ok(["dvc", "status", "--json"], proj, env))
    assert {"changed deps": {"metrics/base_model_source.json": "modified"}} in status["base_model"], status
    assert {"changed deps": {"metrics/vision_source.json": "modified"}} in status["train"], status
    run_ok(["dvc", "repro", "--single-item", "train"], proj, env)  # train alone: the new vision tower
    second = json.loads((proj / "metrics" / "train.json").read_text())
    assert second["ray_run_name"] != first["ray_run_name"] and second["restored_from_step"] is None


# -- warm start from the registry's champion --------------------------------------------------------------
def _train_evaluate_register(params: Path, project_dir: Path) -> tuple[dict, dict]:
    from mpe.stages import evaluate, register

    summary = _train(params)
    p = load_params(params)
    evaluate.run(p)
    return summary, register.run(p, project=project_dir)


def test_a_run_warm_started_from_the_champion_records_its_version_in_the_new_version_s_lineage(
    project, tmp_path, ray_session
):
    import mlflow
    from safetensors.torch import load_file

    from mpe.model.multi_prompt_clip import MultiPromptCLIP
    from mpe.serving.mlflow_model import download_model_folder
    from mpe.training.checkpoint import trainable_state

    vision = write_tiny_siglip(tmp_path / "siglip")
    params = copy_project(
        project,
        tmp_path,
        train={"max_steps": 2, "checkpoint_every": 2},
        model={"vision": {"pretrained": str(vision)}},  # the champion's tower is saved in its folder
        evaluate={"compare_untrained": False},
    )
    scratch, v1 = _train_evaluate_register(params, tmp_path)
    assert v1["version"] == "1" and v1["alias"] == "champion" and scratch["start"] == {"init_from": "scratch"}
    _edit(params, train={"init_from": "champion"})
    warm, v2 = _train_evaluate_register(params, tmp_path)
    assert warm["start"]["init_from"] == "champion" and warm["start"]["version"] == "1"
    assert warm["ray_run_name"] != scratch["ray_run_name"]
    mlflow.set_tracking_uri(load_params(params).mlflow.tracking_uri)
    champion = MultiPromptCLIP.from_pretrained(download_model_folder("models:/mpe-multiprompt/1"))
    started = load_file(str(tmp_path / "ray_results" / warm["ray_run_name"] / "start.safetensors"))
    assert started.keys() == trainable_state(champion).keys()
    assert all((started[k] == v).all() for k, v in trainable_state(champion).items())  # v1's weights, exactly
    tags = mlflow.MlflowClient().get_model_version("mpe-multiprompt", v2["version"]).tags
    assert tags["init_from"] == "champion" and tags["init_from_version"] == "1"
    assert tags["init_from_sha256"] == warm["start"]["weights_sha256"]
    assert mlflow.MlflowClient().get_model_version("mpe-multiprompt", "1").tags["init_from"] == "scratch"

    # a champion of another architecture, and one whose files are gone: one line each, before any training
    champion = f"version {mlflow.MlflowClient().get_model_version_by_alias('mpe-multiprompt', 'champion').version}"
    other = copy_project(project, tmp_path / "other", model={"vision": {"pretrained": str(vision)}, "embed_dim": 32})
    _edit(other, train={"init_from": "champion"}, mlflow=load_params(params).mlflow.model_dump(mode="json"))
    assert_one_line_error(run_mpe(other, "train"), champion, "model.embed_dim", "train.init_from: scratch")
    for weights in (tmp_path / "mlartifacts").rglob("mpe_weights.safetensors"):
        os.remove(weights)
    _edit(other, model={"embed_dim": 64})
    assert_one_line_error(run_mpe(other, "train"), champion, "cannot be read", "train.init_from: scratch")
    assert not (tmp_path / "other" / "ray_results").exists()
