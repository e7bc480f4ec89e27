"""The main correctness test: prompt i's readout from one masked pass equals a separate
forward pass over ``caption + prompt_i`` through the model's own forward, for every architecture."""

import pytest
import torch

from mpe.config import TextConfig
from mpe.model.text.apt_tokens import add_apt_tokens
from mpe.model.text.prompt_mask import to_additive
from mpe.model.text.prompt_sequence import PAD_SEGMENT, tokenize_captions
from mpe.model.text.tower import LLMTextTower
from tests.conftest import ARCHS, tiny_lm

CAPTIONS = [
    "a large red circle to the left of a small blue square on a striped background",
    "a star",
    "",
    "a small green heart above a purple cross on a plain gray background",
]
TOL = 1e-4


def causal_attention_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A plain causal mask over the same padded batch: the control that must fail the equivalence test
    (here, not in mpe: nothing in the pipeline uses it)."""
    b, t = segment_ids.shape
    cols = torch.arange(t, device=segment_ids.device)
    causal = (cols[:, None] >= cols[None, :])[None].expand(b, t, t)
    real = segment_ids != PAD_SEGMENT
    allowed = causal & real[:, None, :] & real[:, :, None]
    eye = torch.eye(t, dtype=torch.bool, device=segment_ids.device)[None]
    return to_additive(allowed | (~real[:, :, None] & eye), dtype)


def make_tower(arch, tokenizer, attn="eager", **text):
    tokenizer = _fresh(tokenizer)
    cfg = TextConfig(**{"num_prompts": 3, "negation": True, **text, "attn_implementation": attn})
    lm = tiny_lm(arch, tokenizer, attn)
    if cfg.uses_apt:
        add_apt_tokens(lm, tokenizer, cfg.num_prompts, seed=1)
    return LLMTextTower(lm, tokenizer, cfg, embed_dim=48).eval()


def _fresh(tokenizer):
    import copy

    return copy.deepcopy(tokenizer)


def separate_readouts(tower, captions):
    """Reference: one plain forward per (caption, segment), default positions, no custom mask."""
    ids = tokenize_captions(tower.tokenizer, captions, tower.cfg.max_caption_tokens)
    out = []
    for cap in ids:
        rows = []
        if tower.layout.caption_readout == "last":
            rows.append(_final(tower, cap)[-1])
        if tower.layout.caption_readout == "mean":
            rows.append(_final(tower, cap).mean(0))
        for seg, reads in zip(tower.layout.segments, tower.layout.readouts):
            final = _final(tower, list(cap) + list(seg))
            rows.extend(final[len(cap) + o] for o in reads)
        out.append(torch.stack(rows))
    return torch.stack(out)


def _final(tower, ids):
    with torch.no_grad():
        return tower.lm(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]


def _attn_cases():
    for arch in ARCHS:
        for attn in ("eager", "sdpa"):
            if arch == "gemma2" and attn == "sdpa":
                continue  # Gemma2's softcapping has no sdpa path
            yield arch, attn


@pytest.mark.parametrize("arch,attn", list(_attn_cases()))
def test_masked_pass_equals_separate_passes(tokenizer, arch, attn):
    tower = make_tower(arch, tokenizer, attn)
    with torch.no_grad():
        got = tower.readouts(tower.tokenize(CAPTIONS))
    ref = separate_readouts(tower, CAPTIONS)
    assert got.shape == ref.shape == (len(CAPTIONS), 6, 64)
    assert (got - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n_top", [1, 2])
def test_trunk_then_top_equals_full_pass(tokenizer, arch, n_top):
    tower = make_tower(arch, tokenizer, n_top=n_top)
    batch = tower.tokenize(CAPTIONS)
    with torch.no_grad():
        full = tower.readouts(batch)
        states = tower.trunk(batch)
        top_all = tower.top(states, batch, rows_only=False)
        top_rows = tower.top(states, batch, rows_only=True)
    assert (top_all - full).abs().max().item() <= TOL
    assert (top_rows - top_all).abs().max().item() <= TOL


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_plain_causal_mask_fails_the_equivalence(tokenizer, arch):
    """Control: the same batch under an ordinary causal mask lets prompts see each other."""
    tower = make_tower(arch, tokenizer)
    batch = tower.tokenize(CAPTIONS)
    mask = causal_attention_mask(batch.segment_ids, torch.float32)
    with torch.no_grad():
        final = tower.decoder.full_forward(
            batch.input_ids, {"full_attention": mask, "sliding_attention": mask}, batch.position_ids
        )
    got = final[:, batch.readout_cols]
    ref = separate_readouts(tower, CAPTIONS)
    if arch == "llama":  # no sliding window: prompt 1 sees only the caption either way
        assert (got[:, 0] - ref[:, 0]).abs().max().item() <= TOL
    assert (got[:, 1:] - ref[:, 1:]).abs().max().item() > 1e-2


@pytest.mark.parametrize("pooling,k", [("defo", 4), ("prompt_last_token", 1), ("last_token", 1), ("mean", 1)])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_baseline_poolings_equal_separate_passes(tokenizer, pooling, k, arch):
    tower = make_tower(arch, tokenizer, pooling=pooling, num_prompts=k, negation=False)
    batch = tower.tokenize(CAPTIONS)
    with torch.no_grad():
        got = tower.readouts(batch)
        via_cache = tower.top(tower.trunk(batch), batch)
    ref = separate_readouts(tower, CAPTIONS)
    assert got.shape[1] == tower.layout.num_readouts if pooling != "mean" else 1
    assert (got - ref).abs().max().item() <= TOL
    assert (via_cache - ref).abs().max().item() <= TOL


def test_embedding_of_a_caption_does_not_depend_on_its_batch(tokenizer):
    tower = make_tower("llama", tokenizer)
    with torch.no_grad():
        alone = torch.cat([tower(CAPTIONS[i : i + 1]).embedding for i in range(len(CAPTIONS))])
        together = tower(CAPTIONS).embedding
        reversed_ = tower(CAPTIONS[::-1]).embedding.flip(0)
    assert (alone - together).abs().max().item() <= 1e-5
    assert (alone - reversed_).abs().max().item() <= 1e-5
    assert torch.allclose(together.norm(dim=-1), torch.ones(len(CAPTIONS)), atol=1e-5)
