"""Temporal pooling: a clip's frame embeddings ``(B, T, D)`` to one unit vector per clip, as CLIP4Clip does
it (its ``meanP`` and ``seqTransf`` similarity headers), and the rule that picks a clip's frames.

- ``mean``: the mean of the L2-normalised frame embeddings, renormalised. No weights: an image model reads
  video zero-shot, and a clip and the same frames in reverse order get the same embedding.
- ``transformer``: frame position embeddings added, a few pre-norm transformer layers over the frames, the
  input added back (a residual around the whole stack, so an untrained stack stays close to ``mean``), each
  frame renormalised, then the mean as above. Position embeddings let it tell a clip from its reverse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mpe.model.configuration import VideoConfig


def uniform_frame_indices(total: int, n: int) -> list[int]:
    """``n`` frame indices spread evenly over ``total`` frames, first and last included (CLIP4Clip's uniform
    slice: ``linspace(0, total - 1, n)`` truncated). Fewer frames than ``n``: indices repeat, in order, so a
    short clip still fills every position."""
    if total < 1 or n < 1:
        raise ValueError(f"need at least one frame and one index (total {total}, n {n})")
    if n == 1:
        return [0]
    return [int(i * (total - 1) / (n - 1)) for i in range(n)]


class _Block(nn.Module):
    """One pre-norm transformer encoder layer over the frames (no dropout: deterministic in both modes)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TemporalPooling(nn.Module):
    """``(B, T, D)`` L2-normalised frame embeddings to ``(B, D)`` L2-normalised clip embeddings."""

    def __init__(self, cfg: VideoConfig, dim: int):
        super().__init__()
        self.kind = cfg.pooling
        self.num_frames = cfg.num_frames
        if self.kind == "transformer":
            self.position = nn.Parameter(torch.randn(cfg.num_frames, dim) * 0.02)
            self.blocks = nn.ModuleList(_Block(dim, cfg.heads) for _ in range(cfg.layers))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.ndim != 3:
            raise ValueError(f"frame embeddings must be (clips, frames, dim), got {tuple(frames.shape)}")
        if self.kind == "transformer":
            t = frames.shape[1]
            if t > self.num_frames:
                raise ValueError(f"{t} frames per clip, but the model has position embeddings for {self.num_frames}")
            h = frames + self.position[:t]
            for block in self.blocks:
                h = block(h)
            frames = F.normalize(h + frames, dim=-1)
        return F.normalize(frames.mean(1), dim=-1)
