"""Base model resolution: bundled GGUF conversion, local folders, hub ids offline."""

import time

import numpy as np
import pytest
import torch

from mpe.errors import BaseModelError
from mpe.model.base_model import bundled_gguf, resolve_base_model
from mpe.model.text.lm_io import load_lm


def test_bundled_default_is_a_plain_safetensors_checkpoint(base_dir):
    import json

    files = {p.name for p in base_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    config = json.loads((base_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert resolve_base_model("smollm2-135m") == base_dir  # converted once, then reused


def test_bundled_weights_equal_the_dequantized_gguf(base_dir):
    """Independent reference: read the GGUF with the gguf package and dequantize one tensor ourselves."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    reader = GGUFReader(bundled_gguf("smollm2-135m"))
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    ref = dequantize(t.data, t.tensor_type).reshape(49152, 576)
    with safe_open(str(base_dir / "model.safetensors"), "pt") as f:
        got = f.get_tensor("model.embed_tokens.weight").float().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-3)  # stored as bfloat16


def test_local_directory_is_used_as_is(base_dir, tmp_path):
    assert resolve_base_model(str(base_dir)) == base_dir
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match="no config.json"):
        resolve_base_model(str(tmp_path / "empty"))


def test_hub_id_offline_fails_at_once_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(BaseModelError) as err:
        resolve_base_model("google/gemma-2b")
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "google/gemma-2b" in msg and "smollm2-135m" in msg and "local directory" in msg


def test_unknown_name_is_rejected():
    with pytest.raises(BaseModelError, match="neither a directory nor a bundled model"):
        resolve_base_model("no-such-model")


def test_untrained_prompts_read_different_states(base_dir):
    """Distinct APT rows keep the K prompts apart on the real base model; identical rows collapse them."""
    from mpe.config import TextConfig
    from mpe.model.text.apt_tokens import add_apt_tokens
    from mpe.model.text.tower import LLMTextTower

    lm, tok = load_lm(base_dir)
    ids = add_apt_tokens(lm, tok, 4)
    tower = LLMTextTower(lm, tok, TextConfig(num_prompts=4), embed_dim=256)
    caps = ["a large red circle on a striped background", "a small blue star"]
    with torch.no_grad():
        r = tower.readouts(tower.tokenize(caps))[:, :4]
    cos = torch.nn.functional.cosine_similarity(r[:, :, None], r[:, None, :], dim=-1)
    off = ~torch.eye(4, dtype=torch.bool)
    assert cos[:, off].max() < 0.99
    with torch.no_grad():  # the failure mode distinct init avoids
        lm.get_input_embeddings().weight[ids] = lm.get_input_embeddings().weight[ids[0]].clone()
        same = tower.readouts(tower.tokenize(caps))[:, :4]
    assert (same[:, 1:] - same[:, :1]).abs().max() < 1e-4
