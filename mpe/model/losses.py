"""Contrastive, diversity and negation losses (docs/METHOD.md), numerically matching open_clip 3.3.0.

``logit_scale`` is the multiplier itself (open_clip passes ``logit_scale.exp()``). Across workers the
features are gathered *with* gradient and each rank computes its local loss: its own rows against
every column of the global batch, as open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``.

Hard-negative captions (NegCLIP) are more text columns for every image: the global batch's negatives
join its captions in the image→text softmax (more negative pairs in the sigmoid loss); the text→image
side is unchanged. A negative whose text is a caption of the global batch is left out (masked), so no
image is ever pushed away from a caption that describes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "Dist",
    "gather_with_grad",
    "clip_loss",
    "siglip_loss",
    "diversity_loss",
    "negation_loss",
    "HardNegatives",
    "hard_negative_mask",
    "LossTerms",
    "total_loss",
]


@dataclass(frozen=True)
class Dist:
    """Where this process sits among the training workers."""

    rank: int = 0
    world_size: int = 1


def gather_with_grad(x: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0; gradients flow back to each rank's own rows."""
    if dist.world_size == 1:
        return x
    import torch.distributed.nn

    return torch.cat(torch.distributed.nn.all_gather(x.contiguous()), dim=0)


def gather_plain(x: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, without gradient (ids, masks)."""
    if dist.world_size == 1:
        return x
    import torch.distributed

    parts = [torch.empty_like(x) for _ in range(dist.world_size)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def _labels(n: int, dist: Dist, device) -> torch.Tensor:
    return torch.arange(n, device=device) + n * dist.rank


@dataclass
class HardNegatives:
    """A local batch's hard-negative captions: ``embedding`` (M, D) L2-normalised, ``text_ids`` (M,) int64
    ids of their texts, and ``caption_ids`` (N,) the ids of the batch's own captions (equal texts, equal
    ids). A rank holds the same M on every rank (a fixed number per caption; a caption with fewer
    negatives pads with itself, which the mask then leaves out)."""

    embedding: torch.Tensor
    text_ids: torch.Tensor
    caption_ids: torch.Tensor


def hard_negative_mask(negatives: HardNegatives, dist: Dist = Dist()) -> torch.Tensor:
    """``(M_global,)`` bool: which negatives of the global batch are kept, i.e. are not the text of a caption
    anywhere in the global batch."""
    all_neg = gather_plain(negatives.text_ids, dist)
    all_pos = gather_plain(negatives.caption_ids, dist)
    return ~torch.isin(all_neg, all_pos)


def _negative_logits(image_features, negatives: HardNegatives, logit_scale, dist: Dist):
    """``(N, M_global)`` logits of the local images against every kept negative (-inf where masked), and the mask."""
    all_neg = gather_with_grad(negatives.embedding, dist)
    keep = hard_negative_mask(negatives, dist).to(image_features.device)
    logits = logit_scale * image_features @ all_neg.T
    return logits.masked_fill(~keep[None, :], float("-inf")), keep


def clip_loss(
    image_features, text_features, logit_scale, dist: Dist = Dist(), negatives: HardNegatives | None = None
) -> torch.Tensor:
    """Symmetric softmax InfoNCE (CLIP) over the global batch; with ``negatives`` the image→text side has the
    global batch's hard negatives as more columns (NegCLIP)."""
    all_img = gather_with_grad(image_features, dist)
    all_txt = gather_with_grad(text_features, dist)
    logits_per_image = logit_scale * image_features @ all_txt.T
    if negatives is not None:
        logits_per_image = torch.cat(
            [logits_per_image, _negative_logits(image_features, negatives, logit_scale, dist)[0]], dim=1
        )
    logits_per_text = logit_scale * text_features @ all_img.T
    labels = _labels(image_features.shape[0], dist, image_features.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss(
    image_features,
    text_features,
    logit_scale,
    logit_bias,
    dist: Dist = Dist(),
    negatives: HardNegatives | None = None,
) -> torch.Tensor:
    """Pairwise sigmoid loss (SigLIP): local images against every text of the global batch, summed and
    divided by the local batch size; with ``negatives`` every image has the global batch's kept hard
    negatives as more negative pairs."""
    all_txt = gather_with_grad(text_features, dist)
    logits = logit_scale * image_features @ all_txt.T + logit_bias
    n = image_features.shape[0]
    labels = -torch.ones_like(logits)
    labels[:, dist.rank * n : (dist.rank + 1) * n] += 2 * torch.eye(n, device=logits.device, dtype=logits.dtype)
    loss = -F.logsigmoid(labels * logits).sum()
    if negatives is not None:
        neg, keep = _negative_logits(image_features, negatives, logit_scale, dist)
        loss = loss - F.logsigmoid(-(neg[:, keep] + logit_bias)).sum()
    return loss / n


def diversity_loss(prompt_embeddings: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over pairs i≠j of the K prompt pieces ``[N, K, D/K]``, averaged over N."""
    n, k, _ = prompt_embeddings.shape
    if k < 2:
        return prompt_embeddings.new_zeros(())
    p = F.normalize(prompt_embeddings, dim=-1)
    cos = p @ p.transpose(1, 2)
    off = ~torch.eye(k, dtype=torch.bool, device=p.device)
    return cos[:, off].mean()


def negation_loss(
    image_features,
    text_features,
    negated_text_features,
    logit_scale,
    logit_bias=None,
    kind: str = "clip",
    dist: Dist = Dist(),
) -> torch.Tensor:
    """Each caption's negated embedding as one extra hard negative for its own image.

    ``clip``: image→text cross-entropy over the global batch's texts plus one more column, the
    negated embedding of the image's own caption. ``siglip``: one more negative pair per image,
    ``-log σ(-(s·⟨v_i, ¬t_i⟩ + b))``, summed and divided by the local batch size like the sigmoid loss.
    """
    neg_logit = logit_scale * (image_features * negated_text_features).sum(-1)
    if kind == "siglip":
        return -F.logsigmoid(-(neg_logit + logit_bias)).sum() / image_features.shape[0]
    all_txt = gather_with_grad(text_features, dist)
    logits = torch.cat([logit_scale * image_features @ all_txt.T, neg_logit[:, None]], dim=1)
    return F.cross_entropy(logits, _labels(image_features.shape[0], dist, image_features.device))


@dataclass
class LossTerms:
    total: torch.Tensor
    contrastive: torch.Tensor
    diversity: torch.Tensor
    negation: torch.Tensor


def total_loss(
    image_features,
    text,
    logit_scale,
    logit_bias,
    kind: str,
    lambda_div: float,
    lambda_neg: float,
    dist: Dist = Dist(),
    negatives: HardNegatives | None = None,
) -> LossTerms:
    """``L_con + λ_div·L_div + λ_neg·L_neg`` for a :class:`~mpe.model.text.tower.TextEmbedding` ``text``; with
    ``negatives``, ``L_con`` has the hard-negative captions as more negatives."""
    if kind == "clip":
        con = clip_loss(image_features, text.embedding, logit_scale, dist, negatives)
    else:
        con = siglip_loss(image_features, text.embedding, logit_scale, logit_bias, dist, negatives)
    div = diversity_loss(text.pieces) if lambda_div > 0 else con.new_zeros(())
    if text.negated is not None and lambda_neg > 0:
        neg = negation_loss(image_features, text.embedding, text.negated, logit_scale, logit_bias, kind, dist)
    else:
        neg = con.new_zeros(())
    return LossTerms(con + lambda_div * div + lambda_neg * neg, con, div, neg)
