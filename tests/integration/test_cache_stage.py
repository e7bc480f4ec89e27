"""The hidden-state cache for real: states equal a fresh trunk pass, reruns compute nothing,
a killed run resumes, another configuration never reuses the folder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mpe.cache_compute import cache_fields, load_trunk_tower
from mpe.cache_store import HiddenStateCache
from mpe.config import load_params
from mpe.data.evaluation_sets import evaluation_texts
from mpe.data.loader import split_captions
from mpe.errors import CacheMismatch
from mpe.stages.cache import run as run_cache_stage


def load_text_tower(params, base):
    return load_trunk_tower(Path(base), params.model.text)


def open_cache(params, base):
    return HiddenStateCache.for_config(params.cache.root, cache_fields(Path(base), params.model.text, params.cache.dtype))


def texts_to_cache(params):
    root = Path(params.data.out_dir)
    return list(dict.fromkeys(split_captions(root / "shards" / "train") + evaluation_texts(root)))


def test_cache_holds_exactly_the_trunk_states(project):
    root, params = project
    tower = load_text_tower(params, Path(params.base_model.out_dir))
    cache = open_cache(params, params.base_model.out_dir)
    texts = texts_to_cache(params)
    assert len(cache) == len(texts) and not cache.missing(texts)
    sample = texts[:3] + texts[-3:]
    batch = tower.tokenize(sample)
    with torch.no_grad():
        fresh = tower.trunk(batch)
    seg = tower.layout.segments_len
    for i, t in enumerate(sample):
        stored, c = cache.get(t)
        assert c == batch.caption_lens[i].item()
        expect = fresh[i, -(c + seg):]
        assert stored.dtype == torch.float16
        # another batch composition (padding) moves fp32 results in the last bits, then fp16 rounds
        assert torch.allclose(stored.float(), expect, rtol=2e-3, atol=2e-3)
    # and the padded batch the top reads gives the same readouts as the full pass
    states, lens = cache.batch(sample)
    with torch.no_grad():
        via_cache = tower.top(states, tower.arrange(lens))
        full = tower.readouts(batch)
    assert (via_cache - full).abs().max() < 5e-2  # float16 storage


def test_rerun_computes_nothing(project):
    _, params = project
    summary = run_cache_stage(params)
    assert summary["computed"] == 0 and summary["already_cached"] == summary["entries"]


def test_other_config_gets_another_folder_and_a_mismatch_is_refused(project):
    root, params = project
    base = Path(params.base_model.out_dir)
    folder = open_cache(params, base).folder
    other = params.model_copy(update={"cache": params.cache.model_copy(update={"dtype": "float32"})})
    assert open_cache(other, base).folder != folder
    fields = json.loads((folder / "manifest.json").read_text())
    fields["num_prompts"] = 5
    with pytest.raises(CacheMismatch, match="num_prompts"):
        HiddenStateCache(folder, fields)


def test_killed_cache_run_resumes(project, tmp_path):
    root, params = project
    data = yaml.safe_load((root / "params.yaml").read_text())
    data["cache"] = {**data["cache"], "root": str(tmp_path / "cache"), "part_size": 4, "batch_size": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mpe.cli", "--params", str(tmp_path / "params.yaml"), "cache"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list((tmp_path / "cache").rglob("part-*.json"))) < 3:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done_parts = len(list((tmp_path / "cache").rglob("part-*.json")))
    assert done_parts >= 3
    params2 = load_params(tmp_path / "params.yaml")
    total = len(texts_to_cache(params2))
    summary = run_cache_stage(params2)
    assert summary["already_cached"] >= 3 * 4
    assert summary["already_cached"] + summary["computed"] == total == summary["entries"]
    assert not list((tmp_path / "cache").rglob(".part-*"))  # no temp file left behind


def test_ray_data_engine_writes_the_same_cache(project, tmp_path, ray_session):
    """cache.engine: ray runs the trunk in Ray Data map_batches actors; the states match the local engine."""
    root, params = project
    ray_params = params.model_copy(update={"cache": params.cache.model_copy(
        update={"engine": "ray", "root": str(tmp_path / "cache"), "part_size": 16})})
    summary = run_cache_stage(ray_params)
    assert summary["computed"] == summary["entries"] == len(texts_to_cache(params))
    base = Path(params.base_model.out_dir)
    local, remote = open_cache(params, base), open_cache(ray_params, base)
    for t in texts_to_cache(params)[::7]:
        a, ca = local.get(t)
        b, cb = remote.get(t)
        assert ca == cb and torch.allclose(a.float(), b.float(), rtol=2e-3, atol=2e-3)
