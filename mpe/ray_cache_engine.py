"""The cache's Ray engine (``cache.engine: ray``): Ray Data ``map_batches`` on actors (GPU actors at
scale) compute the trunk states; the driver writes the parts, so the folder stays resumable."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from mpe.cache_compute import autocast_dtype, load_trunk_tower, trunk_states
from mpe.cache_store import HiddenStateCache
from mpe.config import CacheConfig, RayConfig, TextConfig
from mpe.ray_cluster import ensure_ray


class TrunkActor:
    """Loads the trunk once per actor and maps batches of texts to their trunk states."""

    def __init__(self, text_json: str, base_dir: str, trust_remote_code: bool, autocast_mode: str):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        text = TextConfig.model_validate_json(text_json)
        self.tower = load_trunk_tower(Path(base_dir), text, trust_remote_code, self.device)
        self.autocast = autocast_dtype(autocast_mode, self.device)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        texts = list(batch["text"])
        rows, lens = trunk_states(self.tower, texts, self.autocast)
        out = np.empty(len(rows), dtype=object)
        out[:] = [r.numpy() for r in rows]
        return {"text": np.array(texts, dtype=object), "states": out, "caption_len": np.array(lens)}


def fill_cache_with_ray(cache: HiddenStateCache, texts: list[str], base_dir: Path, text: TextConfig,
                        trust_remote_code: bool, cfg: CacheConfig, ray_cfg: RayConfig) -> int:
    """Compute the states the cache lacks on Ray Data actors; returns how many were computed."""
    import ray

    todo = cache.missing(texts)
    if not todo:
        return 0
    ensure_ray(ray_cfg)
    ds = ray.data.from_items([{"text": t} for t in todo]).map_batches(
        TrunkActor, fn_constructor_kwargs={"text_json": text.model_dump_json(), "base_dir": str(base_dir),
                                           "trust_remote_code": trust_remote_code, "autocast_mode": cfg.autocast},
        batch_size=cfg.batch_size, concurrency=cfg.ray_actors, num_gpus=cfg.gpus_per_actor or None,
        batch_format="numpy")
    bar = tqdm(total=len(todo), desc="cache trunk states (ray)", unit="caption")
    for batch in ds.iter_batches(batch_size=cfg.part_size, batch_format="numpy"):
        states = [torch.from_numpy(s.copy()) for s in batch["states"]]  # Ray hands out read-only arrays
        cache.write_part(list(batch["text"]), states, [int(c) for c in batch["caption_len"]])
        bar.update(len(states))
    bar.close()
    return len(todo)
