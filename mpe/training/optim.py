"""AdamW without weight decay on norms, biases, scales and embeddings; linear warmup then cosine."""

from __future__ import annotations

import math

import torch


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    lowered = name.lower()
    return (
        p.ndim < 2
        or "norm" in lowered
        or "embed" in lowered
        or "logit_" in lowered
        or "positional" in lowered
        or lowered.endswith(".bias")
    )


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, lr: float, weight_decay: float, betas=(0.9, 0.98), eps: float = 1e-6):
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier at ``step``: linear 0→1 over ``warmup``, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, warmup: int, total: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total))
