"""The prompt-wise attention mask.

Caption tokens attend causally among themselves; each prompt segment attends to every caption
token and causally within itself, never to another segment. The mask is additive float
``(B, 1, T, T)`` (0 allowed, ``finfo(dtype).min`` blocked): a boolean 4D mask is silently wrong under
``eager`` attention. Pad rows attend to themselves only, so that no softmax row is empty (NaN).
"""

from __future__ import annotations

import torch

from mpe.model.text.prompt_sequence import CAPTION_SEGMENT, PAD_SEGMENT


def allowed_pairs(
    segment_ids: torch.Tensor, position_ids: torch.Tensor | None = None, sliding_window: int | None = None
) -> torch.Tensor:
    """Boolean ``(B, T, T)``: may query row ``q`` attend to key column ``k``.

    With ``sliding_window`` the query also sees only keys less than that many *positions* back, which
    is what a sliding-window layer does over the standalone ``caption + prompt`` sequence.
    """
    b, t = segment_ids.shape
    sq = segment_ids[:, :, None]
    sk = segment_ids[:, None, :]
    cols = torch.arange(t, device=segment_ids.device)
    causal = cols[None, :, None] >= cols[None, None, :]
    real = (sq != PAD_SEGMENT) & (sk != PAD_SEGMENT)
    allowed = real & causal & ((sq == sk) | (sk == CAPTION_SEGMENT))
    if sliding_window is not None:
        if position_ids is None:
            raise ValueError("a sliding window needs position_ids")
        dist = position_ids[:, :, None] - position_ids[:, None, :]
        allowed &= dist < sliding_window
    pad_rows = segment_ids == PAD_SEGMENT
    eye = torch.eye(t, dtype=torch.bool, device=segment_ids.device)[None]
    return allowed | (pad_rows[:, :, None] & eye)


def to_additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean ``(B, T, T)`` to the additive float ``(B, 1, T, T)`` transformers expects."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, blocked)[:, None]


def prompt_attention_mask(
    segment_ids: torch.Tensor,
    dtype: torch.dtype,
    position_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The prompt-wise additive mask ``(B, 1, T, T)``."""
    return to_additive(allowed_pairs(segment_ids, position_ids, sliding_window), dtype)
