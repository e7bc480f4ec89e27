"""The cache stage for real: shard-aligned states equal a fresh trunk pass, reruns compute nothing, a
killed run resumes shard by shard, a changed data shard is recomputed, another configuration never
reuses the folder, the Ray engine writes the same shards, and any fsspec URL works as the root."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from mpe.cache.compute import cache_fields, load_trunk_tower
from mpe.cache.store import CacheFolder, ShardReader, TextStates, open_active
from mpe.config import load_params
from mpe.data.evaluation_sets import evaluation_texts
from mpe.data.loader import load_split
from mpe.files import storage
from mpe.files.verified import RECORD
from mpe.stages.cache import run as run_cache_stage


def _active(params):
    base = Path(params.base_model.out_dir)
    return open_active(params.cache.root, cache_fields(base, params.model.text, params.cache.dtype))


def _train_shards(params):
    return storage.list_files(storage.join(params.data.out_dir, "shards", "train"), ".tar")


def _assert_same_states(got: torch.Tensor, want: torch.Tensor, bf16: bool) -> None:
    """Trunk states of the same text from two passes: in bf16 another batch composition (padding) moves
    results by a few units of its precision; in fp32 only the last bits move, then float16 storage rounds."""
    if bf16:
        assert ((got - want).norm(dim=-1) / want.norm(dim=-1)).max() < 0.03
    else:
        assert torch.allclose(got, want, rtol=2e-3, atol=2e-3)


def test_cache_shards_hold_exactly_the_trunk_states_of_their_samples(project):
    _, params = project
    tower = load_trunk_tower(Path(params.base_model.out_dir), params.model.text)
    folder = _active(params)
    samples = load_split(Path(params.data.out_dir) / "shards" / "train")[0]
    seg = tower.layout.segments_len
    seen = 0
    for shard in _train_shards(params):
        r = ShardReader(folder.shard_url("train", shard))
        assert r.metadata["data_shard"] == storage.name(shard)
        by_key = {s.key: s for s in samples}
        keys = [k for k in r.keys]
        assert keys == sorted(keys)  # the data shard's (canonical) order
        seen += len(keys)
        pick = list(range(0, len(keys), 9))[:6]
        caps = [by_key[keys[i]].caption for i in pick]
        bf16 = folder.fields["compute_dtype"] == "bfloat16"  # what the start-up probe chose on this machine
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            fresh = tower.trunk(tower.tokenize(caps)).float()
        for j, i in enumerate(pick):
            u = int(r.sample_text[i])
            c = int(r.caption_lens[u])
            _assert_same_states(r.rows(u), fresh[j, -(c + seg) :], bf16)
    assert seen == len(samples)
    texts = TextStates(folder)
    evaluation = evaluation_texts(Path(params.data.out_dir))
    assert all(t in texts for t in evaluation) and len(texts) == len(set(evaluation))
    states, lens = texts.batch(evaluation[:3])
    batch = tower.tokenize(evaluation[:3])
    with torch.no_grad():  # the padded batch the top reads gives the readouts of a fresh trunk pass
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            fresh = tower.trunk(batch).float()
        want = tower.top(fresh, batch)
        got = tower.top(states, tower.arrange(lens))
        assert ((got - want).norm(dim=-1) / want.norm(dim=-1)).max() < (0.03 if bf16 else 5e-3)


def test_rerun_computes_nothing_and_the_estimate_came_first(project, capsys):
    _, params = project
    summary = run_cache_stage(params)
    assert summary["shards_computed"] == 0 and summary["texts_computed"] == 0
    out = capsys.readouterr().out
    assert "unique texts" in out and "GB on disk" in out
    actual = sum(os.path.getsize(p) for p in Path(summary["folder"]).rglob("*.safetensors"))
    assert 0.7 < summary["estimate"]["bytes"] / actual < 1.3, (summary["estimate"], actual)


def test_other_config_gets_another_folder_and_a_mismatch_is_refused(project):
    _, params = project
    base = Path(params.base_model.out_dir)
    fields = cache_fields(base, params.model.text, params.cache.dtype)
    other = cache_fields(base, params.model.text, "float8_e4m3_row")
    assert CacheFolder(params.cache.root, fields).key != CacheFolder(params.cache.root, other).key
    assert (
        CacheFolder(params.cache.root, fields).key
        != CacheFolder(
            params.cache.root, cache_fields(base, params.model.text, params.cache.dtype, compute_dtype="bfloat16")
        ).key
    )


def _copy_project(root: Path, tmp_path: Path, **cache) -> Path:
    data = yaml.safe_load((root / "params.yaml").read_text())
    data["cache"] = {**data["cache"], "root": str(tmp_path / "cache"), **cache}
    data["metrics_dir"] = str(tmp_path / "metrics")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    return tmp_path / "params.yaml"


def _finished(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("train/*.safetensors") if not p.name.startswith(".")]


def test_killed_cache_run_resumes_shard_by_shard(project, tmp_path):
    root, _ = project
    path = _copy_project(root, tmp_path, batch_size=1)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mpe.cli", "--params", str(path), "cache"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not _finished(tmp_path / "cache"):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done = {p: p.stat().st_mtime_ns for p in _finished(tmp_path / "cache")}
    assert done, "no shard finished before the kill"
    params = load_params(path)
    n = len(_train_shards(params))
    summary = run_cache_stage(params)
    assert summary["shards_computed"] == n - len(done)
    assert {p: p.stat().st_mtime_ns for p in done} == done  # finished shards were kept, not recomputed
    left = [p for p in (tmp_path / "cache").rglob("*") if p.name.startswith(".") and p.name != RECORD]
    assert not left  # no temp file left (the verification record is not one)
    assert len(_finished(tmp_path / "cache")) == n


def test_a_changed_data_shard_is_recomputed(project, tmp_path):
    import shutil

    root, params = project
    data = tmp_path / "data"
    shutil.copytree(params.data.out_dir, data)
    path = _copy_project(root, tmp_path)
    p = yaml.safe_load(path.read_text())
    p["data"]["out_dir"] = str(data)
    path.write_text(yaml.safe_dump(p))
    params2 = load_params(path)
    assert run_cache_stage(params2)["shards_computed"] == len(_train_shards(params2))
    parquet = sorted((data / "shards" / "train").glob("*.parquet"))[0]
    import pandas as pd

    df = pd.read_parquet(parquet)
    df.loc[0, "caption"] = df.loc[0, "caption"] + " (edited)"  # the shard's index changed: stale cache
    df.to_parquet(parquet, index=False)
    assert run_cache_stage(params2)["shards_computed"] == 1


def test_ray_data_engine_writes_the_same_shards(project, tmp_path, ray_session):
    """...and, with hard negatives on, each data shard's negatives shard: the texts the generator draws for its
    captions, with the trunk states a local tower computes for them."""
    from mpe.cache.compute import load_trunk_tower, shard_negative_texts, trunk_states_of_ids
    from mpe.cache.store import text_digest
    from mpe.model.text.prompt_sequence import tokenize_captions

    root, params = project
    path = _copy_project(root, tmp_path, engine="ray")
    ray_params = load_params(path, ["train.hard_negatives.enabled=true", "train.hard_negatives.per_caption=2"])
    summary = run_cache_stage(ray_params)
    assert summary["shards_computed"] == len(_train_shards(params))
    assert summary["negative_shards_computed"] == len(_train_shards(params))
    tower = load_trunk_tower(Path(params.base_model.out_dir), params.model.text)
    bf16 = _active(ray_params).fields["compute_dtype"] == "bfloat16"  # what the start-up probe chose here
    for shard in _train_shards(params):
        negatives = ShardReader(_active(ray_params).negatives_url(shard))
        texts = shard_negative_texts(shard, 2, 0)
        assert negatives.num_texts == len(texts) > 0
        index = {bytes(negatives.text_sha256[u].tolist()): u for u in range(negatives.num_texts)}
        ids = tokenize_captions(tower.tokenizer, texts[:3], params.model.text.max_caption_tokens)
        with torch.no_grad():
            fresh = trunk_states_of_ids(tower, ids, torch.bfloat16 if bf16 else None)
        for text, rows in zip(texts[:3], fresh):
            _assert_same_states(negatives.rows(index[text_digest(text)]), rows.float(), bf16)
    local, remote = _active(params), _active(ray_params)
    bf16 = "bfloat16" in {local.fields["compute_dtype"], remote.fields["compute_dtype"]}
    for shard in _train_shards(params):
        a, b = ShardReader(local.shard_url("train", shard)), ShardReader(remote.shard_url("train", shard))
        assert a.keys == b.keys and torch.equal(a.row_offsets, b.row_offsets)
        for u in range(0, a.num_texts, 5):
            _assert_same_states(a.rows(u), b.rows(u), bf16)
    assert len(TextStates(remote)) == len(TextStates(local))


def test_file_urls_for_data_and_cache_go_through_fsspec(project, tmp_path):
    root, _ = project
    url_params = load_params(_copy_project(root, tmp_path))
    url_params = url_params.model_copy(
        update={
            "cache": url_params.cache.model_copy(update={"root": (tmp_path / "cache").as_uri()}),
            "data": url_params.data.model_copy(update={"out_dir": Path(url_params.data.out_dir).as_uri()}),
        }
    )
    summary = run_cache_stage(url_params)
    assert summary["folder"].startswith("file://") and summary["shards_computed"] > 0
    assert list((tmp_path / "cache").rglob("train/*.safetensors"))
    folder = _active(url_params)
    assert ShardReader(folder.shard_url("train", _train_shards(url_params)[0])).keys
