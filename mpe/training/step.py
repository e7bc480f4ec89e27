"""One optimisation step of the training objective, the same on one process and on many."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from mpe.model.losses import Dist, HardNegatives
from mpe.model.objective import model_loss, text_from_cache
from mpe.model.text.tower import TextEmbedding


@dataclass
class Batch:
    """Images and their captions, or the captions' cached trunk states (left-padded ``(B, T, H)``); with hard
    negatives, their texts (or cached states) and the ids of every caption and negative text."""

    pixels: torch.Tensor
    captions: list[str] | None = None
    states: torch.Tensor | None = None
    caption_lens: list[int] | None = None
    negative_texts: list[str] | None = None
    negative_states: torch.Tensor | None = None
    negative_lens: list[int] | None = None
    caption_ids: torch.Tensor | None = None
    negative_ids: torch.Tensor | None = None

    def text(self, model) -> TextEmbedding:
        if self.states is not None:
            return text_from_cache(model, self.states.to(model.device), self.caption_lens)
        return model.text_features(self.captions)

    def negatives(self, model) -> HardNegatives | None:
        """The hard negatives' embeddings and ids, or None when the batch has none."""
        if self.negative_ids is None:
            return None
        if self.negative_states is not None:
            emb = text_from_cache(model, self.negative_states.to(model.device), self.negative_lens).embedding
        else:
            emb = model.text_features(self.negative_texts).embedding
        return HardNegatives(emb, self.negative_ids.to(model.device), self.caption_ids.to(model.device))


class NonFiniteStep(Exception):
    """This step's loss or gradients are not finite on some worker; raised on every worker at once (the
    count travels with the gradients), before the optimiser step, so the weights stay those of the step
    before. ``loss`` is this worker's local loss, ``rows`` its samples whose embeddings are not finite."""

    def __init__(self, loss: float, rows: list[int], workers: int):
        super().__init__(f"non-finite loss ({loss}) on {workers} worker(s)")
        self.loss, self.rows, self.workers = loss, rows, workers


def allreduce_mean_(params, flag: float = 0.0) -> float:
    """Average the gradients of ``params`` over all workers (in one flat buffer), and sum ``flag`` over
    the workers in the same buffer (no extra round trip); returns the sum."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor([flag], dtype=grads[0].dtype)])
    dist.all_reduce(flat)
    total = float(flat[-1])
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return total


def _non_finite_rows(batch: Batch, text: TextEmbedding) -> list[int]:
    """This worker's samples whose pixels, cached states or text embeddings hold a NaN or an infinity."""

    def rows(t: torch.Tensor) -> torch.Tensor:
        return ~torch.isfinite(t.detach()).reshape(t.shape[0], -1).all(1).cpu()

    bad = rows(text.embedding) | rows(batch.pixels)
    for t in (text.negated, batch.states):
        if t is not None:
            bad |= rows(t)
    return [int(i) for i in torch.nonzero(bad).flatten()]


def train_step(
    model,
    batch: Batch,
    optimizer,
    scheduler,
    trainable: list,
    grad_clip: float,
    dist: Dist = Dist(),
    autocast: torch.dtype | None = None,
) -> dict[str, float]:
    """Forward, backward, gradient all-reduce and clip, optimiser and scheduler step, logit-scale clamp.

    The local loss is computed against the global batch (features gathered with gradient); gradients
    are averaged across workers explicitly, as the model's methods run outside a DDP forward.
    Returns the loss terms, learning rate and logit scale of this step. A loss or gradient that is not
    finite on any worker raises :class:`NonFiniteStep` on every worker before the optimiser step.
    """
    device_type = batch.pixels.device.type
    with torch.autocast(device_type, dtype=autocast, enabled=autocast is not None):
        with record_function("mpe.text_top"):
            text = batch.text(model)
            negatives = batch.negatives(model)
        with record_function("mpe.vision_and_loss"):
            terms = model_loss(model, batch.pixels, text, dist, negatives)
    optimizer.zero_grad(set_to_none=True)
    with record_function("mpe.backward"):
        terms.total.backward()
    loss = terms.total.detach()
    with record_function("mpe.allreduce_and_clip"):
        workers_bad = allreduce_mean_(trainable, 0.0 if bool(torch.isfinite(loss)) else 1.0)
        norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    if workers_bad or not bool(torch.isfinite(norm)):  # the same on every worker: the gradients are shared
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteStep(float(loss), _non_finite_rows(batch, text), max(1, round(workers_bad)))
    with record_function("mpe.optimizer"):
        optimizer.step()
        scheduler.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(model.cfg.loss.max_logit_scale))
    return {
        "loss": terms.total.item(),
        "contrastive": terms.contrastive.item(),
        "diversity": terms.diversity.item(),
        "negation": terms.negation.item(),
        "lr": scheduler.get_last_lr()[0],
        "logit_scale": model.logit_scale.exp().item(),
    }
