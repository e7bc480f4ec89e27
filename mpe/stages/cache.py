"""Stage ``cache``: the frozen trunk's hidden states, one cache shard per training data shard (its samples
in its order) plus one shard of the evaluation texts, under a key of everything that changes them.
Shards already built from the same data are kept: a killed or repeated run computes only what is
missing. The disk it will take is printed before anything is computed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mpe.cache.compute import (
    TEXTS_IDENTITY,
    ShardCheck,
    cache_data_shard,
    cache_fields,
    cache_negatives_shard,
    cache_texts,
    data_shard_identity,
    estimate_bytes,
    load_trunk_tower,
    negatives_identity,
    trunk_info,
)
from mpe.cache.ray_engine import build_with_ray
from mpe.cache.store import STORAGE, CacheFolder
from mpe.config import Params
from mpe.data.evaluation_sets import evaluation_texts
from mpe.data.stats import verified_shards
from mpe.errors import StageInputError
from mpe.files import storage
from mpe.files.atomic import write_json
from mpe.files.verified import RECORD
from mpe.records import CACHE, metrics_file
from mpe.runtime.precision import autocast_dtype, cpu_bf16_speedup, dtype_name


def _announce(est: dict, dtype: str, warn_gb: float) -> None:
    gb = est["bytes"] / 1e9
    print(
        f"cache: {est['samples']:,} samples, {est['unique_texts']:,} unique texts × ~{est['mean_rows']:.0f} rows "
        f"× {est['hidden']} hidden × {est['bytes_per_value']} B ({dtype}) ≈ {gb:,.2f} GB on disk",
        flush=True,
    )
    if gb > warn_gb:
        print(
            f"WARNING: the cache will take about {gb:,.0f} GB, above cache.warn_gb ({warn_gb:g}); a float8 "
            "cache.dtype (float8_e4m3_row) halves float16's size",
            flush=True,
        )


def run(params: Params) -> dict:
    cfg = params.cache
    # beside the metrics, not in the cache folder: a rerun that computes nothing leaves the cache's hash as it was
    summary_file = metrics_file(params.metrics_dir, CACHE)
    if not cfg.enabled:
        summary = {"enabled": False}
        write_json(summary_file, summary)
        return summary
    base_dir = Path(params.base_model.out_dir)
    data_root = params.data.out_dir
    text, trust = params.model.text, params.base_model.trust_remote_code
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # the precision is decided here, once, and enters the key; Ray actors are told, not left to probe
    where = "cuda" if cfg.engine == "ray" and cfg.gpus_per_actor > 0 else device
    autocast = autocast_dtype(cfg.autocast, where)
    info = trunk_info(base_dir, text, trust)
    folder = CacheFolder(cfg.root, cache_fields(base_dir, text, cfg.dtype, trust, dtype_name(autocast), info))
    folder.ensure()
    data_shards, corrupt = verified_shards(data_root, "train", params.data.skip_corrupt_shards)
    if not data_shards:
        raise StageInputError(f"{storage.join(data_root, 'shards', 'train')}: no training shards; run `mpe data`")
    for sub in ("train", "texts", "negatives"):
        storage.remove_stale_temporaries(storage.join(folder.url, sub), keep=(RECORD,))
    # a shard built from other data, or damaged since it was written (checksums), is computed again
    check = ShardCheck()
    jobs = [(d, folder.shard_url("train", d)) for d in data_shards]
    jobs = [(d, out) for d, out in jobs if check.check(out, data_shard_identity(d)) != "current"]
    hard = params.train.hard_negatives
    negative_jobs = []
    if hard.enabled:  # the hard negatives of every training caption (train.hard_negatives)
        negative_jobs = [
            (d, folder.negatives_url(d))
            for d in data_shards
            if check.check(folder.negatives_url(d), negatives_identity(d, hard.per_caption, hard.seed)) != "current"
        ]
    eval_texts = list(dict.fromkeys(evaluation_texts(data_root)))
    texts_out = folder.texts_url(eval_texts)
    texts_job = [] if check.check(texts_out, TEXTS_IDENTITY) == "current" else [(eval_texts, texts_out)]
    check.save()
    for damage in check.damage.values():
        print(f"cache: recomputing a damaged shard: {damage.split('; ')[0]}", flush=True)

    est = estimate_bytes(
        data_shards,
        len(eval_texts),
        info,
        text.max_caption_tokens,
        STORAGE[cfg.dtype].itemsize,
        negatives_per_caption=hard.per_caption if hard.enabled else 0,
    )
    _announce(est, cfg.dtype, cfg.warn_gb)
    started = time.perf_counter()
    bar = tqdm(desc="cache trunk states", unit="text")
    if cfg.engine == "ray":
        ray_jobs = jobs + [("texts:" + json.dumps(t), o) for t, o in texts_job]
        ray_jobs += [
            ("negatives:" + json.dumps({"data": d, "per_caption": hard.per_caption, "seed": hard.seed}), o)
            for d, o in negative_jobs
        ]
        computed = build_with_ray(ray_jobs, base_dir, text, trust, cfg, params.ray, dtype_name(autocast), bar.update)
    else:
        tower = load_trunk_tower(base_dir, text, trust, device)
        computed = 0
        for d, out in jobs:
            computed += cache_data_shard(tower, d, out, cfg.dtype, cfg.batch_size, autocast, bar.update)["texts"]
        for t, out in texts_job:
            computed += cache_texts(tower, t, out, cfg.dtype, cfg.batch_size, autocast, bar.update)["texts"]
        for d, out in negative_jobs:
            computed += cache_negatives_shard(
                tower, d, out, hard.per_caption, hard.seed, cfg.dtype, cfg.batch_size, autocast, bar.update
            )["texts"]
    bar.close()
    for _, out in jobs + texts_job + negative_jobs:
        check.written(out)
    check.save()
    folder.write_active()
    summary = {
        "folder": folder.url,
        "key": folder.key,
        "compute_dtype": folder.fields["compute_dtype"],
        # what decided it: bf16's speed over fp32's, measured here (None where not measured: CUDA, a fixed mode)
        "bf16_speedup_measured": round(cpu_bf16_speedup(), 3) if cfg.autocast == "auto" and where == "cpu" else None,
        "storage_dtype": cfg.dtype,
        "data_shards": len(data_shards),
        "shards_computed": len(jobs),
        "shards_reused": len(data_shards) - len(jobs),
        "computed_shards": sorted(storage.name(d) for d, _ in jobs),  # this run's, by data shard
        "damaged_shards": sorted(storage.name(url) for url in check.damage),  # recomputed: they failed their checksums
        "negative_shards_computed": len(negative_jobs),
        "texts_computed": computed,
        "skipped_corrupt_shards": corrupt,
        "compute_seconds": round(time.perf_counter() - started, 2),
        "estimate": est,
    }
    write_json(summary_file, summary)
    return summary
