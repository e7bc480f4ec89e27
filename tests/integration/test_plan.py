"""The planner against what the cache stage really writes: for the session project's small corpus, the bytes
it predicts for the cache's tensors (states, float8 scales, index) are those of the shards on disk, in
float16 and in float8 (the JSON header with the sample keys is estimated apart)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from mpe.cache.compute import cache_fields
from mpe.cache.store import open_active
from mpe.config import load_params
from mpe.files import storage
from mpe.planning.cluster import ClusterSpec
from mpe.planning.plan import build_plans
from tests.project_config import copy_project

CLUSTER = ClusterSpec(
    name="this machine",
    accelerator={"kind": "cpu", "peak_tflops": {"float32": 0.1}},
    cpus_per_node=2,
    network_gbit_per_s=1,
    storage_gbyte_per_s=1,
    download_images_per_s_per_core=100,
    utilisation={"cache": 0.5, "train": 0.3, "evaluate": 0.2},
)


def _written(params) -> tuple[int, int]:
    """Bytes of the tensors and of the headers of every cache shard the cache stage wrote (train and texts)."""
    fields = cache_fields(Path(params.base_model.out_dir), params.model.text, params.cache.dtype)
    folder = open_active(params.cache.root, fields)
    tensors = headers = 0
    for sub in ("train", "texts"):
        for url in storage.list_files(storage.join(folder.url, sub), ".safetensors"):
            with storage.open_read(url) as f:
                n = struct.unpack("<Q", f.read(8))[0]
            headers += 8 + n
            tensors += storage.size(url) - 8 - n
    return tensors, headers


@pytest.mark.parametrize("dtype", ["float16", "float8_e4m3_row"])
def test_the_planned_cache_bytes_are_the_bytes_the_cache_stage_wrote(project, tmp_path, dtype):
    from mpe.stages import cache

    root, params = project
    if dtype != params.cache.dtype:  # the same corpus cached again in this dtype (tiny trunk: seconds)
        params = load_params(copy_project(project, tmp_path, cache={"dtype": dtype}))
        cache.run(params)
    tensors, headers = _written(params)
    (plan,) = build_plans(params, [CLUSTER])
    assert plan.cache_dtype == dtype
    assert plan.cache_bytes == tensors
    assert plan.cache_header_bytes == pytest.approx(headers, rel=0.05)
    texts = plan.corpus.train.texts + plan.corpus.eval_texts.texts
    assert plan.stage("cache").detail.startswith(f"{texts:,} texts")
