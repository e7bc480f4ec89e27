"""Aspect re-weighted inference: ``s(t, v) = Σ_k w_k ⟨t_k, v_k⟩``. The K weights are chosen on the
validation split by coordinate ascent over a small grid, then the test split is scored with them; the
gain over ``w = 1`` is what the choice is worth."""

from __future__ import annotations

import torch

from mpe.retrieval_metrics import retrieval_from_scores

GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


def weighted_scores(text_emb: torch.Tensor, image_emb: torch.Tensor, weights, k: int) -> torch.Tensor:
    """``(Nt, Nv)`` of ``Σ_k w_k ⟨t_k, v_k⟩`` over the K segments (``MultiPromptCLIP.similarity``)."""
    w = torch.as_tensor(weights, dtype=text_emb.dtype)
    return torch.einsum("akd,bkd,k->ab", text_emb.view(len(text_emb), k, -1), image_emb.view(len(image_emb), k, -1), w)


def objective(metrics: dict) -> float:
    """What the search maximises: the mean of every R@k both ways."""
    vals = [v for key, v in metrics.items() if "_R@" in key]
    return sum(vals) / len(vals)


def search(text_emb, image_emb, positives, k: int, ks=(1, 5, 10), grid=GRID, rounds: int = 2) -> tuple[list[float], float]:
    """Weights maximising :func:`objective` on the given (validation) split, and that objective."""
    weights = [1.0] * k
    best = objective(retrieval_from_scores(weighted_scores(text_emb, image_emb, weights, k), positives, ks))
    for _ in range(rounds):
        changed = False
        for i in range(k):
            for g in grid:
                trial = weights[:i] + [g] + weights[i + 1:]
                score = objective(retrieval_from_scores(weighted_scores(text_emb, image_emb, trial, k), positives, ks))
                if score > best + 1e-12:
                    best, weights, changed = score, trial, True
        if not changed:
            break
    return weights, best
