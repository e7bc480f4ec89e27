"""Which Ray Train run a training belongs to: ``<run_name>-<fingerprint>``, where the fingerprint covers
everything that shapes the trajectory. The same inputs resume the same run; new inputs start afresh
instead of silently continuing a run trained on something else.

The schedule is part of the trajectory: the learning rate of every step follows from the total number of
steps, so a run of ``epochs: 3`` is not the first 48 steps of a run of ``epochs: 8``. The fingerprint
holds the total steps the run trains for (whether ``epochs`` or ``max_steps`` set it), not the keys."""

from __future__ import annotations

import math

from mpe.config import BaseModelConfig, TrainConfig
from mpe.files.hashing import fingerprint
from mpe.model.configuration import ModelConfig

# Settings that do not change what a step computes: a rerun that differs only in these resumes. ``epochs``
# and ``max_steps`` enter through the total steps they give (``total_steps``), which the fingerprint holds.
RESUMABLE_TRAIN_KEYS = {
    "run_name",
    "storage_path",
    "out_dir",
    "epochs",
    "max_steps",
    "checkpoint_every",
    "keep_checkpoints",
    "max_failures",
    "fail_at_step",
    "log_every",
    "save_dtype",
    "threads_per_worker",
    "log_sample_keys",
}


def run_fingerprint(
    seed: int,
    model: ModelConfig,
    train: TrainConfig,
    base_model: BaseModelConfig,
    data_stats: dict | None,
    cache_fields: dict | None,
    start: dict | None = None,
    steps: int | None = None,
    model_files: dict | None = None,
) -> str:
    """Hash of the model, seed, data, cache and optimiser settings, the total ``steps`` (the schedule), the
    content of the model folders the run reads (``model_files``: the prepared base LLM's and a pretrained
    vision tower's sha256, not their paths) and the weights the run starts from (``start``: the champion's
    version and weights hash under ``train.init_from: champion``)."""
    train_keys = {k: v for k, v in train.model_dump(mode="json").items() if k not in RESUMABLE_TRAIN_KEYS}
    return fingerprint(
        {
            "seed": seed,
            "model": model.model_dump(mode="json"),
            "train": train_keys,
            "total_steps": steps,
            "base_model": base_model.model_dump(mode="json"),
            "model_files": model_files,
            "data": data_stats,
            "cache": cache_fields,
            "start": start,
        },
        8,
    )


def effective_run_name(run_name: str, fp: str) -> str:
    return f"{run_name}-{fp}"


def total_steps(train: TrainConfig, n_samples: int) -> int:
    """``max_steps``, or ``epochs`` over ``n_samples`` at the global batch size."""
    per_epoch = math.ceil(n_samples / (train.batch_size * train.num_workers))
    return train.max_steps or max(1, math.ceil(train.epochs * per_epoch))
