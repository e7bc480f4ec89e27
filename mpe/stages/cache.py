"""Stage ``cache``: the frozen trunk's hidden states for every unique text the pipeline embeds (training
captions and evaluation texts), stored once under a key of everything that changes them; resumable."""

from __future__ import annotations

from pathlib import Path

import torch

from mpe.atomic import write_json
from mpe.cache_compute import autocast_dtype, cache_fields, fill_cache, load_trunk_tower
from mpe.cache_store import HiddenStateCache
from mpe.config import Params
from mpe.data.evaluation_sets import evaluation_texts
from mpe.data.loader import split_captions
from mpe.ray_cache_engine import fill_cache_with_ray


def run(params: Params) -> dict:
    cfg = params.cache
    # beside the metrics, not in the cache folder: a rerun that computes nothing leaves the cache's hash as it was
    summary_file = Path(params.evaluate.out_dir) / "cache.json"
    if not cfg.enabled:
        summary = {"enabled": False}
        write_json(summary_file, summary)
        return summary
    base_dir = Path(params.base_model.out_dir)
    data_root = Path(params.data.out_dir)
    text = params.model.text
    trust = params.base_model.trust_remote_code
    cache = HiddenStateCache.for_config(cfg.root, cache_fields(base_dir, text, cfg.dtype, trust))
    texts = list(dict.fromkeys(split_captions(data_root / "shards" / "train") + evaluation_texts(data_root)))
    before = len(cache)
    if cfg.engine == "ray":
        computed = fill_cache_with_ray(cache, texts, base_dir, text, trust, cfg, params.ray)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        tower = load_trunk_tower(base_dir, text, trust, device)
        computed = fill_cache(cache, tower, texts, cfg.batch_size, cfg.part_size, autocast_dtype(cfg.autocast, device))
    summary = {"folder": str(cache.folder), "key": cache.folder.name, "texts": len(texts),
               "already_cached": before, "computed": computed, "entries": len(cache)}
    write_json(summary_file, summary)
    return summary
