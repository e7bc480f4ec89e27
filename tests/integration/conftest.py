"""A small project on disk: tiny base LLM, a small shapes world, every stage run for real once."""

from __future__ import annotations

import shutil

import pytest

from mpe.config import load_params
from tests.project_config import PRISTINE_PARAMS, small_params, write_params


@pytest.fixture(scope="session")
def project(tiny_base_dir, tmp_path_factory):
    """data → base_model → cache, run once for the session; returns (root, params)."""
    from mpe.stages import base_model, cache, data

    root = tmp_path_factory.mktemp("project")
    params = load_params(write_params(root, small_params(root, tiny_base_dir)))
    shutil.copyfile(root / "params.yaml", root / PRISTINE_PARAMS)
    data.run(params)
    base_model.run(params)
    cache.run(params)
    return root, params


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the session, shut down at the end."""
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()
