"""Computing trunk states for the cache: the trunk-only text tower, the cache key of a base model, and
the local engine that fills a cache folder batch by batch (resumable by part)."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from mpe.cache_store import HiddenStateCache, key_fields
from mpe.config import TextConfig
from mpe.hashing import checkpoint_sha256
from mpe.text.lm_io import load_lm
from mpe.text.prompt_sequence import build_layout
from mpe.text.tower import LLMTextTower


def load_trunk_tower(base_dir: Path, text: TextConfig, trust_remote_code: bool = False,
                     device: str = "cpu") -> LLMTextTower:
    """The LLM text tower on the prepared base model, without projections (only the trunk is used)."""
    lm, tok = load_lm(base_dir, text.attn_implementation, torch.float32, trust_remote_code)
    return LLMTextTower(lm, tok, text, None).to(device).eval()


def cache_fields(base_dir: Path, text: TextConfig, storage_dtype: str, trust_remote_code: bool = False) -> dict:
    """The cache key fields for ``text`` on the base model in ``base_dir``, read from its tokenizer and
    config alone (the weights enter through their hash)."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    n_layers = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code).num_hidden_layers
    return key_fields(checkpoint_sha256(base_dir), build_layout(tok, text), text, storage_dtype, n_layers)


def autocast_dtype(mode: str, device: str) -> torch.dtype | None:
    """``cache.autocast``: bf16 when asked, or on CUDA under ``auto``; None means fp32 compute."""
    if mode == "bfloat16" or (mode == "auto" and device == "cuda"):
        return torch.bfloat16
    return None


def trunk_rows(states: torch.Tensor, caption_lens: list[int], segments_len: int) -> list[torch.Tensor]:
    """Each caption's own rows (no left padding) of a padded ``(B, T, H)`` trunk output, as fp32 on CPU."""
    return [states[i, -(c + segments_len):].float().cpu() for i, c in enumerate(caption_lens)]


@torch.no_grad()
def trunk_states(tower: LLMTextTower, texts: list[str], autocast: torch.dtype | None):
    """``(per-caption rows, caption lengths)`` of one batch of texts."""
    batch = tower.tokenize(texts)
    device_type = batch.segment_ids.device.type
    with torch.autocast(device_type, dtype=autocast, enabled=autocast is not None):
        h = tower.trunk(batch)
    lens = batch.caption_lens.tolist()
    return trunk_rows(h, lens, tower.layout.segments_len), lens


def fill_cache(cache: HiddenStateCache, tower: LLMTextTower, texts: list[str], batch_size: int = 32,
               part_size: int = 256, autocast: torch.dtype | None = None) -> int:
    """Run the trunk over every text the cache lacks; returns how many were computed."""
    todo = cache.missing(texts)
    if not todo:
        return 0
    tower.eval()
    bar = tqdm(total=len(todo), desc="cache trunk states", unit="caption")
    for p0 in range(0, len(todo), part_size):
        chunk = todo[p0:p0 + part_size]
        states, lens = [], []
        for b0 in range(0, len(chunk), batch_size):
            rows, c = trunk_states(tower, chunk[b0:b0 + batch_size], autocast)
            states += rows
            lens += c
            bar.update(len(rows))
        cache.write_part(chunk, states, lens)
    bar.close()
    return len(todo)
