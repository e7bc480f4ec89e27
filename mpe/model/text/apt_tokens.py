"""Adaptive prompt tokens ``<APT-1>`` … ``<APT-K>``: added to the tokenizer, each row initialised distinctly.

transformers' ``resize_token_embeddings`` gives new rows that are almost identical (~1e-5 apart), so
K prompts that differ only in their APT token would produce the same states and collapse. We draw
every new row independently at the scale of the existing matrix instead.
"""

from __future__ import annotations

import torch


def apt_token(i: int) -> str:
    """The i-th (1-based) adaptive prompt token string."""
    return f"<APT-{i}>"


def apt_tokens(k: int) -> list[str]:
    return [apt_token(i) for i in range(1, k + 1)]


def add_apt_tokens(model, tokenizer, k: int, seed: int = 0) -> list[int]:
    """Add ``<APT-1..k>`` to ``tokenizer`` and ``model`` (idempotent); return their ids.

    New embedding rows are ``mean + std * N(0, 1)`` with the per-dimension mean and std of the
    existing rows, drawn from a generator seeded with ``seed``.
    """
    tokens = apt_tokens(k)
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    emb = model.get_input_embeddings()
    old_rows = emb.weight.shape[0]
    needed = max(max(ids) + 1, len(tokenizer))
    if needed > old_rows:
        model.resize_token_embeddings(needed, mean_resizing=False)
        emb = model.get_input_embeddings()
        with torch.no_grad():
            w = emb.weight
            ref = w[:old_rows].float()
            gen = torch.Generator().manual_seed(seed)
            new = ref.mean(0) + ref.std(0) * torch.randn(needed - old_rows, w.shape[1], generator=gen)
            w[old_rows:] = new.to(w.dtype)
    return ids
