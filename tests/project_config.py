"""Params for the small on-disk projects the integration and e2e tests build."""

from __future__ import annotations

from pathlib import Path

import yaml


def small_params(root: Path, base: Path, **overrides) -> dict:
    p = {
        "seed": 0,
        "data": {"out_dir": str(root / "data"), "image_size": 32, "samples_per_shard": 40,
                 "shapes": {"train_captions": 48, "images_per_caption": 2, "val_captions": 0,
                            "test_captions": 24, "negation_queries": 10}},
        "base_model": {"name": str(base), "out_dir": str(root / "models" / "base"), "save_dtype": "float32"},
        "model": {"embed_dim": 64, "text": {"num_prompts": 2, "max_caption_tokens": 32},
                  "vision": {"image_size": 32, "patch_size": 8, "hidden_size": 64, "num_layers": 2,
                             "num_heads": 2, "intermediate_size": 128}},
        "cache": {"root": str(root / "cache"), "batch_size": 8},
        "train": {"storage_path": str(root / "ray_results"), "out_dir": str(root / "models" / "trained"),
                  "batch_size": 16, "max_steps": 6, "checkpoint_every": 2, "log_every": 1,
                  "save_dtype": "float32"},
        "evaluate": {"out_dir": str(root / "metrics"), "plots_dir": str(root / "plots")},
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlruns.db'}", "artifact_root": str(root / "mlartifacts")},
    }
    for section, values in overrides.items():
        p[section] = {**p.get(section, {}), **values} if isinstance(values, dict) else values
    return p


def write_params(root: Path, data: dict) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def has_intact_checkpoint(ray_results: Path) -> bool:
    """Whether some run under ``ray_results`` holds a checkpoint that reads back whole (a test that kills
    the run as soon as a checkpoint folder appears would otherwise race its writing)."""
    from mpe.checkpoint import newest_intact

    return ray_results.is_dir() and any(newest_intact(d) for d in ray_results.glob("*") if d.is_dir())
