"""One forward of the training objective: images and captions (or cached trunk states) to the loss."""

from __future__ import annotations

import torch

from mpe.model.losses import Dist, HardNegatives, LossTerms, total_loss
from mpe.model.text.tower import TextEmbedding


def text_from_cache(model, states: torch.Tensor, caption_lens: list[int]) -> TextEmbedding:
    """Finish the text pass from cached trunk states (left-padded ``(B, T, H)``)."""
    batch = model.text.arrange(caption_lens)
    return model.text.embed_readouts(model.text.top(states, batch))


def model_loss(
    model, pixel_values: torch.Tensor, text: TextEmbedding, dist: Dist = Dist(), negatives: HardNegatives | None = None
) -> LossTerms:
    """``L_con + λ_div·L_div + λ_neg·L_neg`` for a batch whose text side (and hard negatives) is already embedded."""
    image = model.vision(pixel_values)
    scale, bias = model.scale_and_bias()
    loss = model.cfg.loss
    return total_loss(image, text, scale, bias, loss.kind, loss.lambda_div, loss.lambda_neg, dist, negatives)
