"""MultiPromptCLIP on tiny random towers: encoding, similarity, persistence, LoRA, baselines."""

import copy

import pytest
import torch
from PIL import Image

from mpe.config import ModelConfig
from mpe.model.multi_prompt_clip import MultiPromptCLIP
from mpe.model.text.apt_tokens import add_apt_tokens
from mpe.model.text.tower import LLMTextTower
from mpe.model.vision.tower import VisionTower
from tests.conftest import tiny_lm

TINY_VISION = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "intermediate_size": 64,
}


def tiny_model(tokenizer, arch="llama", **text):
    cfg = ModelConfig(embed_dim=48, text={"num_prompts": 3, **text}, vision=TINY_VISION)
    tok = copy.deepcopy(tokenizer)
    if cfg.text.pooling == "vanilla_clip":
        from mpe.model.text.vanilla_clip import VanillaCLIPTextTower

        text_tower = VanillaCLIPTextTower(tok, cfg.text.vanilla, cfg.embed_dim)
    else:
        lm = tiny_lm(arch, tok, cfg.text.attn_implementation)
        if cfg.text.uses_apt:
            add_apt_tokens(lm, tok, cfg.text.num_prompts)
        text_tower = LLMTextTower(lm, tok, cfg.text, cfg.embed_dim)
    torch.manual_seed(0)
    return MultiPromptCLIP(cfg, text_tower, VisionTower(cfg.vision, cfg.embed_dim)).eval()


def images(n):
    return [Image.new("RGB", (40 + 3 * i, 36), (30 * i % 255, 80, 200 - 20 * i)) for i in range(n)]


def test_encode_shapes_and_norms(tokenizer):
    m = tiny_model(tokenizer)
    with torch.no_grad():
        t = m.encode_text(["a red circle", "a blue square on a striped background"])
        v = m.encode_image(images(3))
    assert t.shape == (2, 48) and v.shape == (3, 48)
    assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert m.prompt_readouts(["a red circle"]).shape == (1, 3, 64)
    assert m.prompt_readouts(["a red circle"], negated=True).shape == (1, 3, 64)


def test_similarity_weights_are_a_segment_wise_sum(tokenizer):
    m = tiny_model(tokenizer)
    t, v = (
        torch.nn.functional.normalize(torch.randn(2, 48), dim=-1),
        torch.nn.functional.normalize(torch.randn(3, 48), dim=-1),
    )
    assert torch.allclose(m.similarity(t, v), t @ v.T, atol=1e-6)
    w = [1.25, 0.9, 0.85]
    brute = torch.zeros(2, 3)
    for a in range(2):
        for b in range(3):
            brute[a, b] = sum(w[k] * (t[a, 16 * k : 16 * (k + 1)] @ v[b, 16 * k : 16 * (k + 1)]) for k in range(3))
    assert torch.allclose(m.similarity(t, v, w), brute, atol=1e-6)
    with pytest.raises(ValueError, match="one entry per prompt"):
        m.similarity(t, v, [1.0, 2.0])


@pytest.mark.parametrize(
    "text",
    [
        {},
        {"tuning": "lora"},
        {"pooling": "defo", "num_prompts": 4, "negation": False},
        {"pooling": "vanilla_clip", "num_prompts": 1, "negation": False},
    ],
)
def test_save_and_load_round_trip(tokenizer, tmp_path, text):
    m = tiny_model(tokenizer, **text)
    if text.get("tuning") == "lora":  # make the adapters non-zero so merging matters
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    caps = ["a red circle", "a small white star above a black heart"]
    with torch.no_grad():
        t0, v0 = m.encode_text(caps), m.encode_image(images(2))
    m.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "mpe_weights.safetensors").exists()
    assert not list((tmp_path / "m").rglob("*.bin")) and not list((tmp_path / "m").rglob("*.pt"))
    m2 = MultiPromptCLIP.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        t1, v1 = m2.encode_text(caps), m2.encode_image(images(2))
    assert (t0 - t1).abs().max() < 1e-5 and (v0 - v1).abs().max() < 1e-5


def test_text_model_folder_loads_with_plain_transformers(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = tiny_model(tokenizer)
    m.save_pretrained(tmp_path / "m")
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "text_model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m" / "text_model")
    ids = tok.convert_tokens_to_ids(["<APT-1>", "<APT-2>", "<APT-3>"])
    assert len(set(ids)) == 3 and all(i != tok.unk_token_id for i in ids)
    assert torch.equal(lm.get_input_embeddings().weight[ids], m.text.lm.get_input_embeddings().weight[ids])


def test_trainable_parameters_by_mode(tokenizer):
    m = tiny_model(tokenizer, n_top=1)
    names = {n for n, p in m.text.named_parameters() if p.requires_grad}
    assert any(n.startswith("lm.model.layers.2.") for n in names)
    assert not any(n.startswith("lm.model.layers.1.") for n in names)
    assert "lm.model.norm.weight" in names and "lm.model.embed_tokens.weight" not in names
    lora = tiny_model(tokenizer, tuning="lora")
    names = {n for n, p in lora.text.named_parameters() if p.requires_grad}
    assert any("lora_A" in n and "layers.0." in n for n in names)
    assert not any("base_layer" in n for n in names)


def test_only_apt_rows_of_the_embedding_train(tokenizer):
    m = tiny_model(tokenizer, train_apt_embeddings=True)
    emb = m.text.lm.get_input_embeddings().weight
    m.text(["a red circle"]).embedding.sum().backward()
    rows = emb.grad.abs().sum(1).nonzero().flatten().tolist()
    apt = m.text.tokenizer.convert_tokens_to_ids(["<APT-1>", "<APT-2>", "<APT-3>"])
    assert sorted(rows) == sorted(apt)


def test_a_conv_stem_keeps_the_token_grid_and_round_trips(tokenizer, tmp_path):
    """model.vision.stem: conv gives the patch embedding's token grid (patch maps still 4×4 at 32 px / 8), its
    own weights (three stride-2 convolutions and a 1×1 for patch 8), and saves and loads like the rest."""
    from mpe.model.vision.stem import ConvStem

    cfg = ModelConfig(embed_dim=48, text={"num_prompts": 3}, vision={**TINY_VISION, "stem": "conv"})
    m = tiny_model(tokenizer)
    m = MultiPromptCLIP(cfg, m.text, VisionTower(cfg.vision, cfg.embed_dim)).eval()
    stem = m.vision.vit.get_input_embeddings()
    assert isinstance(stem, ConvStem) and sum(isinstance(x, torch.nn.Conv2d) for x in stem.convs) == 4
    with torch.no_grad():
        grid = m.vision.patch_states(m.pixel_values(images(2)))
        v0 = m.encode_image(images(2))
    assert grid.shape[:2] == (2, 16)
    m.save_pretrained(tmp_path / "m")
    with torch.no_grad():
        v1 = MultiPromptCLIP.from_pretrained(tmp_path / "m").encode_image(images(2))
    assert (v0 - v1).abs().max() < 1e-5
    with pytest.raises(ValueError, match="power-of-two"):
        ModelConfig(vision={**TINY_VISION, "stem": "conv", "patch_size": 6, "image_size": 36})
