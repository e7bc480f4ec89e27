"""A small project on disk: tiny base LLM, a small shapes world, every stage run for real once."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from mpe.config import load_params
from tests.conftest import tiny_lm


def small_params(root: Path, base: Path, **overrides) -> dict:
    p = {
        "seed": 0,
        "data": {"out_dir": str(root / "data"), "image_size": 32, "samples_per_shard": 40,
                 "shapes": {"train_captions": 48, "images_per_caption": 2, "val_captions": 8,
                            "test_captions": 24, "negation_queries": 10}},
        "base_model": {"name": str(base), "out_dir": str(root / "models" / "base"), "save_dtype": "float32"},
        "model": {"embed_dim": 64, "text": {"num_prompts": 2, "max_caption_tokens": 32},
                  "vision": {"image_size": 32, "patch_size": 8, "hidden_size": 64, "num_layers": 2,
                             "num_heads": 2, "intermediate_size": 128}},
        "cache": {"root": str(root / "cache"), "batch_size": 8, "part_size": 32},
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


@pytest.fixture(scope="session")
def tiny_base_dir(tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-base")
    tok = copy.deepcopy(tokenizer)
    lm = tiny_lm("llama", tok)
    lm.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def project(tiny_base_dir, tmp_path_factory):
    """data → base_model → cache, run once for the session; returns (root, params)."""
    from mpe.base_model import prepare_base_model
    from mpe.cache import run_cache_stage
    from mpe.data.prepare import prepare_data

    root = tmp_path_factory.mktemp("project")
    params = load_params(write_params(root, small_params(root, tiny_base_dir)))
    prepare_data(params.data, params.seed)
    prepare_base_model(params)
    run_cache_stage(params)
    return root, params


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the session, shut down at the end."""
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()
