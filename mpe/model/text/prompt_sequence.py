"""One sequence per caption: ``[bos] caption [prompt_1] … [prompt_K] [neg_1] … [neg_K]``, left-padded.

Every prompt segment is tokenized on its own, so its ids do not depend on the caption, and left
padding keeps each segment in the same columns across the batch: the readout columns are shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpe.errors import ConfigError
from mpe.model.configuration import TextConfig
from mpe.model.text.apt_tokens import apt_token, apt_tokens

PAD_SEGMENT = -1
CAPTION_SEGMENT = 0


@dataclass(frozen=True)
class PromptLayout:
    """The segments appended to every caption and the rows read out of them.

    ``segments[s]`` holds the token ids of segment ``s + 1``; ``readouts[s]`` the offsets inside it
    that are read. ``caption_readout`` is ``"last"`` or ``"mean"`` for the pooling baselines that read
    the caption itself, else ``"none"``. The first ``num_positive`` readouts form the text embedding,
    the rest (negated prompts) its negated twin.
    """

    segments: tuple[tuple[int, ...], ...]
    readouts: tuple[tuple[int, ...], ...]
    caption_readout: str = "none"
    num_positive: int = 0

    @property
    def segments_len(self) -> int:
        return sum(len(s) for s in self.segments)

    @property
    def num_readouts(self) -> int:
        return sum(len(r) for r in self.readouts) + (1 if self.caption_readout == "last" else 0)


def _encode(tokenizer, text: str) -> tuple[int, ...]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"model.text: prompt text {text!r} tokenizes to nothing")
    return tuple(ids)


def build_layout(tokenizer, cfg: TextConfig) -> PromptLayout:
    """The prompt layout for ``cfg.pooling`` with ``tokenizer`` (APT tokens must already be added)."""
    k = cfg.num_prompts
    if cfg.pooling == "multi_prompt":
        segs = [_encode(tokenizer, cfg.prompt_template.format(apt=apt_token(i))) for i in range(1, k + 1)]
        if cfg.negation:
            segs += [_encode(tokenizer, cfg.negated_template.format(apt=apt_token(i))) for i in range(1, k + 1)]
        return PromptLayout(tuple(segs), tuple((len(s) - 1,) for s in segs), "none", k)
    if cfg.pooling == "defo":
        ids = tuple(tokenizer.convert_tokens_to_ids(apt_tokens(k)))
        return PromptLayout((ids,), (tuple(range(k)),), "none", k)
    if cfg.pooling == "prompt_last_token":
        seg = _encode(tokenizer, cfg.fixed_prompt)
        return PromptLayout((seg,), ((len(seg) - 1,),), "none", 1)
    if cfg.pooling == "last_token":
        return PromptLayout((), (), "last", 1)
    if cfg.pooling == "mean":
        return PromptLayout((), (), "mean", 1)
    raise ValueError(f"pooling {cfg.pooling!r} does not read an LLM")


def start_token_id(tokenizer) -> int | None:
    """The id put before every caption: bos where the tokenizer has one."""
    return tokenizer.bos_token_id


def tokenize_captions(tokenizer, captions: list[str], max_tokens: int) -> list[list[int]]:
    """Caption ids with the start token, truncated to ``max_tokens`` in all.

    A caption that gives no token at all (empty, and no bos) is read as the eos token alone, so
    every caption has at least one row to attend to.
    """
    start = start_token_id(tokenizer)
    out = []
    for i, text in enumerate(captions):
        if not isinstance(text, str):
            raise TypeError(f"caption {i} is {type(text).__name__}, expected str")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ([start] if start is not None else []) + list(ids)
        if not ids:
            ids = [tokenizer.eos_token_id]
        out.append(ids[:max_tokens])
    return out


@dataclass
class PromptBatch:
    """A left-padded batch laid out for the prompt-wise mask.

    ``segment_ids``: -1 pad, 0 caption, ``s`` for prompt segment ``s``; ``position_ids`` restart at
    the caption's end for every segment; ``readout_cols`` are the columns read for every row.
    """

    input_ids: torch.Tensor | None
    segment_ids: torch.Tensor
    position_ids: torch.Tensor
    caption_lens: torch.Tensor
    readout_cols: torch.Tensor
    layout: PromptLayout

    @property
    def length(self) -> int:
        return self.segment_ids.shape[1]

    def to(self, device) -> PromptBatch:
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PromptBatch(
            mv(self.input_ids),
            mv(self.segment_ids),
            mv(self.position_ids),
            mv(self.caption_lens),
            mv(self.readout_cols),
            self.layout,
        )


def arrange(caption_lens: list[int], layout: PromptLayout, length: int | None = None) -> PromptBatch:
    """Segment ids, position ids and readout columns for captions of these lengths (no token ids).

    This is all the top of the model needs to finish a pass over cached trunk states.
    """
    seg_len = layout.segments_len
    longest = max(caption_lens)
    t = longest + seg_len if length is None else length
    if t < longest + seg_len:
        raise ValueError(f"length {t} is shorter than the longest caption plus prompts ({longest + seg_len})")
    b = len(caption_lens)
    segment_ids = torch.full((b, t), PAD_SEGMENT, dtype=torch.long)
    position_ids = torch.zeros((b, t), dtype=torch.long)
    tail_seg = (
        torch.cat([torch.full((len(s),), i + 1, dtype=torch.long) for i, s in enumerate(layout.segments)])
        if layout.segments
        else torch.zeros(0, dtype=torch.long)
    )
    tail_pos = (
        torch.cat([torch.arange(len(s)) for s in layout.segments])
        if layout.segments
        else torch.zeros(0, dtype=torch.long)
    )
    for r, c in enumerate(caption_lens):
        start = t - seg_len - c
        segment_ids[r, start : t - seg_len] = CAPTION_SEGMENT
        position_ids[r, start : t - seg_len] = torch.arange(c)
        segment_ids[r, t - seg_len :] = tail_seg
        position_ids[r, t - seg_len :] = tail_pos + c
    cols = []
    if layout.caption_readout == "last":
        cols.append(t - seg_len - 1)
    offset = t - seg_len
    for seg, reads in zip(layout.segments, layout.readouts):
        cols.extend(offset + o for o in reads)
        offset += len(seg)
    return PromptBatch(
        None,
        segment_ids,
        position_ids,
        torch.tensor(caption_lens, dtype=torch.long),
        torch.tensor(cols, dtype=torch.long),
        layout,
    )


def build_batch(caption_ids: list[list[int]], layout: PromptLayout, pad_id: int) -> PromptBatch:
    """Token ids, segments and positions for already tokenized captions."""
    batch = arrange([len(c) for c in caption_ids], layout)
    t = batch.length
    tail = [i for seg in layout.segments for i in seg]
    ids = torch.full((len(caption_ids), t), pad_id, dtype=torch.long)
    for r, cap in enumerate(caption_ids):
        row = list(cap) + tail
        ids[r, t - len(row) :] = torch.tensor(row, dtype=torch.long)
    batch.input_ids = ids
    return batch
