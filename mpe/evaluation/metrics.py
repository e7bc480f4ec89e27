"""Retrieval and classification metrics (CLIP_benchmark semantics, written independently).

A text→image query is a hit at k when *any* of its positive images is among the k best scores;
image→text likewise over the captions. Recall@k is the fraction of queries that hit.
"""

from __future__ import annotations

import torch


def hits_at_k(scores: torch.Tensor, positives: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean per query (row): does a positive column rank among the top ``k``?

    Ties are broken like ``torch.topk`` would not be relied on: a positive counts if fewer than ``k``
    columns score strictly higher than the best positive.
    """
    if positives.shape != scores.shape:
        raise ValueError(f"positives {tuple(positives.shape)} and scores {tuple(scores.shape)} differ")
    if not positives.any(1).all():
        raise ValueError("every query needs at least one positive")
    best_pos = scores.masked_fill(~positives, float("-inf")).max(1).values
    higher = (scores > best_pos[:, None]).sum(1)
    return higher < k


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor, k: int) -> float:
    return hits_at_k(scores, positives, k).float().mean().item()


def retrieval_metrics(text_emb, image_emb, positives, ks=(1, 5, 10)) -> dict:
    """``text_to_image_R@k`` and ``image_to_text_R@k``; ``positives`` is (n_texts, n_images) bool."""
    return retrieval_from_scores(text_emb @ image_emb.T, positives, ks)


def retrieval_from_scores(scores, positives, ks=(1, 5, 10)) -> dict:
    """The same from a ``(n_texts, n_images)`` score matrix (any similarity, e.g. aspect re-weighted)."""
    out = {}
    for k in ks:
        out[f"text_to_image_R@{k}"] = recall_at_k(scores, positives, k)
        out[f"image_to_text_R@{k}"] = recall_at_k(scores.T, positives.T, k)
    return out
