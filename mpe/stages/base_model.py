"""Stage ``base_model``: resolve the LLM, add the ``<APT-i>`` tokens (rows initialised distinctly), save
safetensors to ``base_model.out_dir``."""

from __future__ import annotations

from pathlib import Path

from mpe.config import Params
from mpe.model.base_model import prepare_base_model
from mpe.model.configuration import APT_POOLINGS


def run(params: Params) -> dict:
    apt = params.model.text.num_prompts if params.model.text.pooling in APT_POOLINGS else 0
    out = prepare_base_model(params.base_model, Path(params.base_model.out_dir), apt, params.model.text.apt_init_seed)
    return {"out_dir": str(out), "apt_tokens": apt}
