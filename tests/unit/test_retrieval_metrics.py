"""Recall@k against CLIP_benchmark's own implementation (clip-benchmark 1.6.2) and brute force."""

import pytest
import torch
from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k as REF  # noqa: E402

from mpe.evaluation.metrics import hits_at_k, recall_at_k, retrieval_metrics


@pytest.mark.parametrize("seed", range(5))
def test_matches_clip_benchmark_with_several_captions_per_image(seed):
    g = torch.Generator().manual_seed(seed)
    n_img, per = 12, 3
    texts = n_img * per
    scores = torch.randn(texts, n_img, generator=g)
    positives = torch.zeros(texts, n_img, dtype=torch.bool)
    for t in range(texts):
        positives[t, t // per] = True
    for k in (1, 5, 10):
        ref_t2i = (REF(scores, positives, k) > 0).float().mean().item()
        ref_i2t = (REF(scores.T, positives.T, k) > 0).float().mean().item()
        assert recall_at_k(scores, positives, k) == pytest.approx(ref_t2i)
        assert recall_at_k(scores.T, positives.T, k) == pytest.approx(ref_i2t)


def test_brute_force_and_perfect_scores():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])
    pos = torch.tensor([[False, False, True], [True, False, False]])
    assert hits_at_k(scores, pos, 1).tolist() == [False, False]
    assert hits_at_k(scores, pos, 2).tolist() == [True, False]
    assert hits_at_k(scores, pos, 3).tolist() == [True, True]
    e = torch.eye(4)
    m = retrieval_metrics(e, e, torch.eye(4, dtype=torch.bool), ks=(1,))
    assert m == {"text_to_image_R@1": 1.0, "image_to_text_R@1": 1.0}
    with pytest.raises(ValueError, match="at least one positive"):
        hits_at_k(scores, torch.zeros(2, 3, dtype=torch.bool), 1)
