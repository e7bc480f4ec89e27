"""The cache's Ray engine (``cache.engine: ray``): Ray Data maps the shard jobs onto actors (GPU actors
at scale); each actor loads the trunk once and writes whole cache shards straight to their storage, so
the driver only sees counts and never holds states."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mpe.cache.compute import cache_data_shard, cache_negatives_shard, cache_texts, load_trunk_tower
from mpe.config import CacheConfig, RayConfig
from mpe.model.configuration import TextConfig
from mpe.runtime.ray_cluster import ensure_ray


class ShardCacheActor:
    """Loads the trunk once; each call builds the cache shards of a batch of jobs."""

    def __init__(
        self,
        text_json: str,
        base_dir: str,
        trust_remote_code: bool,
        compute_dtype: str,
        storage_dtype: str,
        batch_size: int,
    ):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        text = TextConfig.model_validate_json(text_json)
        self.tower = load_trunk_tower(Path(base_dir), text, trust_remote_code, self.device)
        self.autocast = torch.bfloat16 if compute_dtype == "bfloat16" else None
        self.storage_dtype, self.batch_size = storage_dtype, batch_size

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        done = []
        for source, out in zip(batch["source"], batch["out"]):
            if source.startswith("texts:"):
                counts = cache_texts(
                    self.tower,
                    json.loads(source[len("texts:") :]),
                    out,
                    self.storage_dtype,
                    self.batch_size,
                    self.autocast,
                )
            elif source.startswith("negatives:"):
                job = json.loads(source[len("negatives:") :])
                counts = cache_negatives_shard(
                    self.tower,
                    job["data"],
                    out,
                    job["per_caption"],
                    job["seed"],
                    self.storage_dtype,
                    self.batch_size,
                    self.autocast,
                )
            else:
                counts = cache_data_shard(self.tower, source, out, self.storage_dtype, self.batch_size, self.autocast)
            done.append(counts["texts"])
        return {"out": np.array(list(batch["out"]), dtype=object), "texts": np.array(done)}


def build_with_ray(
    jobs: list[tuple[str, str]],
    base_dir: Path,
    text: TextConfig,
    trust_remote_code: bool,
    cfg: CacheConfig,
    ray_cfg: RayConfig,
    compute_dtype: str,
    progress=None,
) -> int:
    """Run ``(source, out URL)`` jobs on Ray Data actors (``source``: a data shard URL, ``texts:`` and a JSON
    list, or ``negatives:`` and a JSON ``{data, per_caption, seed}``); returns how many texts were computed."""
    import ray

    if not jobs:
        return 0
    ensure_ray(ray_cfg)
    ds = ray.data.from_items([{"source": s, "out": o} for s, o in jobs]).map_batches(
        ShardCacheActor,
        fn_constructor_kwargs={
            "text_json": text.model_dump_json(),
            "base_dir": str(base_dir),
            "trust_remote_code": trust_remote_code,
            "compute_dtype": compute_dtype,
            "storage_dtype": cfg.dtype,
            "batch_size": cfg.batch_size,
        },
        batch_size=1,
        concurrency=cfg.ray_actors,
        num_gpus=cfg.gpus_per_actor or None,
        batch_format="numpy",
    )
    total = 0
    for row in ds.iter_rows():
        total += int(row["texts"])
        if progress is not None:
            progress(int(row["texts"]))
    return total
