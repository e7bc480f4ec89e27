"""What the K prompts learned, measured: each piece of the embedding alone (retrieval, and telling a
caption from its one-aspect-changed variants), how alike the pieces are, and what the negated prompts
encode (does an image prefer its caption's embedding to the caption's negated embedding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mpe.evaluation.metrics import recall_at_k


def pieces_of(embedding: torch.Tensor, k: int) -> torch.Tensor:
    """``(N, K, D/K)`` L2-normalised segments of ``(N, D)`` embeddings (what aspect weights act on)."""
    return F.normalize(embedding.view(embedding.shape[0], k, -1), dim=-1)


def per_prompt_recall(
    text_emb: torch.Tensor, image_emb: torch.Tensor, positives: torch.Tensor, k: int, at: int = 1
) -> list[float]:
    """Text→image R@``at`` with the similarity of segment i alone, for each of the K segments."""
    t, v = pieces_of(text_emb, k), pieces_of(image_emb, k)
    return [recall_at_k(t[:, i] @ v[:, i].T, positives, at) for i in range(k)]


def inter_prompt_cosine(raw_pieces: torch.Tensor) -> float:
    """Mean cosine over pairs i≠j of the K projected prompt pieces ``(N, K, D/K)`` (the diversity loss's
    quantity); 0 for K=1."""
    n, k, _ = raw_pieces.shape
    if k < 2:
        return 0.0
    p = F.normalize(raw_pieces.float(), dim=-1)
    cos = p @ p.transpose(1, 2)
    return cos[:, ~torch.eye(k, dtype=torch.bool)].mean().item()


def caption_over_negated(image_emb: torch.Tensor, text_emb: torch.Tensor, negated_emb: torch.Tensor) -> float:
    """Fraction of (image, its caption) pairs where the image scores higher with the caption's embedding
    than with the caption's negated embedding."""
    return ((image_emb * text_emb).sum(1) > (image_emb * negated_emb).sum(1)).float().mean().item()


def aspect_accuracy(
    image_emb: torch.Tensor, true_emb: torch.Tensor, variant_emb: dict[str, torch.Tensor], k: int
) -> dict[str, dict[str, float]]:
    """For each aspect: how often the image scores its true caption above the caption with that aspect
    changed, with the whole embedding (``full``) and with each prompt's segment alone (``prompt_i``)."""
    out = {}
    v, t = pieces_of(image_emb, k), pieces_of(true_emb, k)
    for aspect, alt in variant_emb.items():
        a = pieces_of(alt, k)
        row = {"full": ((image_emb * true_emb).sum(1) > (image_emb * alt).sum(1)).float().mean().item()}
        for i in range(k):
            row[f"prompt_{i + 1}"] = ((v[:, i] * t[:, i]).sum(1) > (v[:, i] * a[:, i]).sum(1)).float().mean().item()
        out[aspect] = row
    return out
