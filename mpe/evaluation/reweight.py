"""Aspect re-weighted inference: ``s(t, v) = Σ_k w_k ⟨t_k, v_k⟩``. The K weights are chosen on the
validation split by coordinate ascent over a small grid, then the test split is scored with them; the
gain over ``w = 1`` is what the choice is worth."""

from __future__ import annotations

from mpe.evaluation.metrics import retrieval_from_scores
from mpe.model.multi_prompt_clip import segment_similarity

GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


def objective(metrics: dict) -> float:
    """What the search maximises: the mean of every R@k both ways."""
    vals = [v for key, v in metrics.items() if "_R@" in key]
    return sum(vals) / len(vals)


def retrieval_with(text_emb, image_emb, positives, weights, ks=(1, 5, 10)) -> dict:
    """R@k both ways under the aspect weights (``MultiPromptCLIP.similarity``)."""
    return retrieval_from_scores(segment_similarity(text_emb, image_emb, weights, len(weights)), positives, ks)


def score_of(text_emb, image_emb, positives, weights, ks=(1, 5, 10)) -> float:
    return objective(retrieval_with(text_emb, image_emb, positives, weights, ks))


def search(
    text_emb, image_emb, positives, k: int, ks=(1, 5, 10), grid=GRID, rounds: int = 2
) -> tuple[list[float], float]:
    """Weights maximising :func:`objective` on the given (validation) split, and that objective."""
    weights = [1.0] * k
    best = score_of(text_emb, image_emb, positives, weights, ks)
    for _ in range(rounds):
        changed = False
        for i in range(k):
            for g in grid:
                trial = weights[:i] + [g] + weights[i + 1 :]
                score = score_of(text_emb, image_emb, positives, trial, ks)
                if score > best + 1e-12:
                    best, weights, changed = score, trial, True
        if not changed:
            break
    return weights, best
