"""Video–text retrieval metrics as the video literature reports them (CLIP4Clip's ``compute_metrics``, written
independently): R@k both ways, the median rank (MdR) and the mean rank (MnR) of the right item, 1-based.

A query's rank is that of its best-scoring positive. Ties are broken at random, in expectation: with ``h``
other items scoring higher and ``e`` scoring the same (within ``TIE``, float rounding), the rank is
``1 + h + e/2`` and a hit at k counts ``(k - h) / (e + 1)`` when the tie straddles k. Without ties this is
the usual definition; with them no item gains from a tie: a clip and its reverse, which mean pooling
embeds alike (to rounding), count half each, not both first.
"""

from __future__ import annotations

import torch

TIE = 1e-6  # scores this close are equal: the same frames summed in another order differ by rounding only


def query_ranks(scores: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query (row): ``(higher, tied)``, how many non-positive columns score above its best positive and
    how many score the same."""
    if positives.shape != scores.shape:
        raise ValueError(f"positives {tuple(positives.shape)} and scores {tuple(scores.shape)} differ")
    if not positives.any(1).all():
        raise ValueError("every query needs at least one positive")
    best = scores.masked_fill(~positives, float("-inf")).max(1).values[:, None]
    negative = ~positives
    higher = ((scores > best + TIE) & negative).sum(1)
    tied = (((scores - best).abs() <= TIE) & negative).sum(1)
    return higher, tied


def expected_hits(higher: torch.Tensor, tied: torch.Tensor, k: int) -> torch.Tensor:
    """Per query, the probability its positive ranks in the top ``k`` when ties are broken at random."""
    return ((k - higher).clamp(min=0).float() / (tied + 1).float()).clamp(max=1.0)


def direction_metrics(scores: torch.Tensor, positives: torch.Tensor, ks, prefix: str) -> dict[str, float]:
    higher, tied = query_ranks(scores, positives)
    ranks = 1 + higher.float() + tied.float() / 2
    out = {f"{prefix}_R@{k}": expected_hits(higher, tied, k).mean().item() for k in ks}
    out[f"{prefix}_MdR"] = torch.quantile(ranks, 0.5).item()  # numpy's median: the middle two averaged
    out[f"{prefix}_MnR"] = ranks.mean().item()
    return out


def video_retrieval_metrics(text_emb, video_emb, positives, ks=(1, 5, 10)) -> dict[str, float]:
    """``text_to_video_R@k``, ``video_to_text_R@k``, ``…_MdR``, ``…_MnR``; ``positives`` is (n_texts,
    n_videos) bool."""
    scores = text_emb @ video_emb.T
    return {
        **direction_metrics(scores, positives, ks, "text_to_video"),
        **direction_metrics(scores.T, positives.T, ks, "video_to_text"),
    }


def two_choice_accuracy(own: torch.Tensor, other: torch.Tensor) -> float:
    """How often ``own`` scores above ``other`` (elementwise); a tie (within ``TIE``) counts half."""
    diff = own - other
    return ((diff > TIE).float() + 0.5 * (diff.abs() <= TIE).float()).mean().item()
