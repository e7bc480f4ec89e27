"""Stage ``train``: Ray Train over the webdataset shards and the hidden-state cache, then the trained
``MultiPromptCLIP`` folder in ``train.out_dir``, the loss history, and the pyfunc logged to MLflow."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from mpe.cache.compute import ShardCheck, data_shard_identity, negatives_identity, open_cache
from mpe.cache.store import CacheCorrupt, CacheFolder
from mpe.config import Params
from mpe.data.stats import data_identity, read_stats, verified_shards
from mpe.errors import StageInputError
from mpe.files import storage
from mpe.files.atomic import atomic_path, check_replaceable, write_json
from mpe.files.hashing import checkpoint_sha256, model_folder_sha256
from mpe.model.base_model import source_label
from mpe.model.vision.pretrained import transform_of
from mpe.records import TRAIN, TRAIN_HISTORY, TrainingSummary, metrics_file
from mpe.runtime.precision import autocast_dtype, dtype_name
from mpe.runtime.project_lock import PROJECT_TAG, project_identity
from mpe.serving.mlflow_model import log_trained_model
from mpe.tracking.settings import tracking_settings
from mpe.training.checkpoint import NonFiniteWeights, load_trainable, non_finite, recorded_compute_dtype
from mpe.training.run_identity import effective_run_name, run_fingerprint, total_steps
from mpe.training.warm_start import champion_start, scratch
from mpe.training.worker import TrainJob, build_model, fit


def _cache_shards(folder: CacheFolder, data_shards: list[str]) -> list[str]:
    """The cache shard of every data shard, each checked to be built from that very shard and to hold the
    bytes it was written with (read in full only if the file changed since it was last verified)."""
    shards = [folder.shard_url("train", d) for d in data_shards]
    _check_current(folder, data_shards, shards, [data_shard_identity(d) for d in data_shards], "cache shard")
    return shards


def _negative_shards(folder: CacheFolder, data_shards: list[str], per_caption: int, seed: int) -> list[str]:
    """The negatives shard of every data shard, each checked to hold that shard's negatives as drawn now."""
    shards = [folder.negatives_url(d) for d in data_shards]
    identities = [negatives_identity(d, per_caption, seed) for d in data_shards]
    _check_current(folder, data_shards, shards, identities, "hard-negatives shard", " (train.hard_negatives is on)")
    return shards


def _check_current(
    folder: CacheFolder, data_shards: list[str], shards: list[str], identities: list[dict], what: str, why: str = ""
) -> None:
    """Refuse to train on a damaged shard (it failed its checksums) or on one not built from its data shard."""
    check = ShardCheck()
    states = [check.check(url, identity) for url, identity in zip(shards, identities)]
    check.save()
    if check.damage:
        first = next(iter(check.damage.values()))
        raise CacheCorrupt(f"{first} ({len(check.damage)} damaged cache shard(s))" if len(check.damage) > 1 else first)
    stale = [d for d, state in zip(data_shards, states) if state != "current"]
    if stale:
        raise StageInputError(
            f"{folder.url}: {len(stale)} of {len(data_shards)} training shards have no current {what} "
            f"(first: {storage.name(stale[0])}); run `mpe cache` first{why}"
        )


def _data_wait_share(history: list[dict], skip_first: bool) -> float | None:
    rows = history[1:] if skip_first else history
    total = sum(r.get("step_s", 0.0) for r in rows)
    return sum(r.get("data_wait_s", 0.0) for r in rows) / total if total else None


def _timing(clock: list[tuple[str, float]], history: list[dict]) -> dict:
    """Seconds per phase of the stage, the steps' own time (this run's steps, rank 0) and the rest."""
    out = {name: round(t - clock[i][1], 2) for i, (name, t) in enumerate(clock[1:])}
    out["total"] = round(clock[-1][1] - clock[0][1], 2)
    out["steps"] = round(sum(r.get("step_s", 0.0) for r in history), 2)
    out["outside_steps"] = round(out["total"] - out["steps"], 2)
    return out


def _model_files(base_dir: Path, cache_fields: dict | None, vision_pretrained: str | None) -> dict:
    """The content of the model folders the run reads: the prepared base LLM (whose ``mpe_base.json`` names
    the content of a local source folder) and a pretrained vision tower, by sha256, never by path."""
    base = cache_fields["model_sha256"] if cache_fields else checkpoint_sha256(base_dir)
    return {"base_model": base, "vision": model_folder_sha256(vision_pretrained) if vision_pretrained else None}


def run(params: Params) -> dict:
    clock = [("start", time.perf_counter())]
    tcfg = params.train
    # where the result goes, checked before minutes of training that could not be put in place
    check_replaceable(tcfg.out_dir, "train.out_dir")
    check_replaceable(metrics_file(params.metrics_dir, TRAIN), "metrics_dir")
    base_dir = Path(params.base_model.out_dir).resolve()
    data_root = storage.absolute(params.data.out_dir)
    data_shards, corrupt = verified_shards(data_root, "train", params.data.skip_corrupt_shards)
    stats = read_stats(data_root)
    n_train = int(stats["splits"]["train"]["successes"])
    total = total_steps(tcfg, n_train)
    cache_shards, fields, negative_shards = None, None, None
    hard = tcfg.hard_negatives
    if params.cache.enabled:
        folder = open_cache(
            storage.absolute(params.cache.root),
            base_dir,
            params.model.text,
            params.cache.dtype,
            params.base_model.trust_remote_code,
        )
        fields = folder.fields
        cache_shards = _cache_shards(folder, data_shards)
        if hard.enabled:
            negative_shards = _negative_shards(folder, data_shards, hard.per_caption, hard.seed)
    settings = tracking_settings(params.mlflow)
    provenance = {"base_model": source_label(params.base_model)}
    start_weights, start = (
        champion_start(settings, params.registry.model_name, params.model, provenance["base_model"])
        if tcfg.init_from == "champion"
        else scratch()
    )
    model_files = _model_files(base_dir, fields, params.model.vision.pretrained)
    run_name = effective_run_name(
        tcfg.run_name,
        run_fingerprint(
            params.seed, params.model, tcfg, params.base_model, data_identity(stats), fields, start, total, model_files
        ),
    )
    ray_storage = Path(tcfg.storage_path).resolve()
    # one decision for every rank, taken here once per run (a resumed run keeps the one it started with):
    # ranks that chose for themselves could disagree and fail in their first collective
    compute_dtype = recorded_compute_dtype(ray_storage / run_name) or dtype_name(
        autocast_dtype(tcfg.autocast, "cuda" if tcfg.use_gpu else "cpu")
    )
    init_file = None
    if start_weights is not None:  # beside the run's checkpoints: the run's folder is named by these weights
        init_file = ray_storage / run_name / "start.safetensors"
        with atomic_path(init_file, suffix=".safetensors") as tmp:
            tmp.write_bytes(start_weights)
    logged = {
        "seed": params.seed,
        "base_model": params.base_model.model_dump(mode="json"),
        "model": params.model.model_dump(mode="json"),
        "train": tcfg.model_dump(mode="json"),
        "cache": {"enabled": params.cache.enabled, "dtype": params.cache.dtype},
        "start": start,
        "compute_dtype": compute_dtype,
    }
    model_cfg = params.model.model_dump(mode="json")
    if params.model.vision.pretrained:  # Ray workers run in their own working folder
        model_cfg["vision"]["pretrained"] = str(Path(params.model.vision.pretrained).resolve())
    job = TrainJob(
        seed=params.seed,
        model=model_cfg,
        train=tcfg.model_dump(mode="json"),
        base_dir=str(base_dir),
        trust_remote_code=params.base_model.trust_remote_code,
        provenance=provenance,
        total_steps=total,
        stream={
            "data_shards": tuple(data_shards),
            "cache_shards": tuple(cache_shards) if cache_shards else None,
            "batch_size": tcfg.batch_size,
            "image_size": params.model.vision.image_size,
            "image_transform": transform_of(params.model.vision).to_json(),
            "shuffle_buffer": tcfg.shuffle_buffer,
            "seed": params.seed,
            "workers": tcfg.loader_workers,
            # a video source's samples are clips, read as the model's num_frames frames each
            "num_frames": params.model.video.num_frames if stats.get("modality") == "video" else 0,
            "hard_negatives": hard.per_caption if hard.enabled else 0,
            "negatives_seed": hard.seed,
            "negative_shards": tuple(negative_shards) if negative_shards else None,
        },
        tracking=asdict(settings),
        logged_params=logged,
        run_tags={**params.mlflow.tags, PROJECT_TAG: project_identity(Path.cwd())},
        run_name=run_name,
        run_dir=str(ray_storage / run_name),
        compute_dtype=compute_dtype,
        init_weights=str(init_file) if init_file else None,
    )
    clock.append(("inputs", time.perf_counter()))
    weights, state = fit(job, tcfg, params.ray, ray_storage)
    clock.append(("ray_train", time.perf_counter()))

    broken = non_finite(weights)
    if broken:  # the step guard stops a non-finite loss; an optimiser step can still overflow a weight
        raise NonFiniteWeights(
            f"{ray_storage / run_name}: the final checkpoint's weights are not finite ({', '.join(broken[:3])}); "
            "nothing was exported: the training diverged (lower train.lr)"
        )
    model = build_model(job)
    load_trainable(model, weights)
    model.provenance.update({"ray_run_name": run_name, "steps": state["step"], "start": start})
    if tcfg.save_dtype == "bfloat16" and hasattr(model.text, "lm"):
        model.text.lm.to(torch.bfloat16)  # the trunk came from a checkpoint of that precision
    out_dir = Path(tcfg.out_dir)
    model.save_pretrained(out_dir)
    clock.append(("export", time.perf_counter()))

    write_json(metrics_file(params.metrics_dir, TRAIN_HISTORY), state["history"], indent=None)
    final = state["history"][-1] if state["history"] else {}
    run_id = state.get("mlflow_run_id")
    # the evaluate stage adds its numbers and plots to this run; register registers the logged model
    model_uri = log_trained_model(settings, run_id, out_dir, params.model.embed_dim) if run_id else None
    clock.append(("log_model", time.perf_counter()))
    summary = TrainingSummary(
        steps=state["step"],
        total_steps=total,
        train_samples=n_train,
        ray_run_name=run_name,
        final_loss=final.get("loss"),
        restored_from_step=state.get("restored_from_step"),
        data_wait_share=_data_wait_share(state["history"], False),
        data_wait_share_after_first_step=_data_wait_share(state["history"], True),
        skipped_samples=state.get("skipped_samples", {}),
        skipped_corrupt_shards=corrupt,
        compute_dtype=compute_dtype,
        start=start,
        mlflow_run_id=run_id,
        model_uri=model_uri,
        seconds=_timing(clock, state["history"]),
    ).to_json()
    write_json(metrics_file(params.metrics_dir, TRAIN), summary)
    return summary
