"""What a video benchmark reader returns, and how it is scored: videos (decoded only when embedded, a batch at a
time, into the model's ``video.num_frames`` frames) and their captions. A video that is empty or does not
decode is left out with its captions, counted by reason and named in the result."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from mpe.data.video_codec import BadVideo, decode_clip
from mpe.evaluation.video_metrics import video_retrieval_metrics


@dataclass(frozen=True)
class VideoRef:
    """One video file; ``where`` names the row it came from."""

    where: str
    path: Path


@dataclass
class VideoRetrievalSet:
    """Videos and their captions (several per video allowed): caption ``j`` belongs to ``caption_video[j]``."""

    videos: list[VideoRef]
    captions: list[str]
    caption_video: list[int]


@torch.no_grad()
def video_retrieval(model, data: VideoRetrievalSet, embed_text, ks, batch_size: int) -> dict:
    """R@k, MdR and MnR both ways over the videos that decode; ``skipped_videos`` (by reason) and
    ``bad_videos`` (named) for the others."""
    n = model.cfg.video.num_frames
    kept, embs, skipped, bad = [], [], Counter(), []
    for start in range(0, len(data.videos), batch_size):
        clips = []
        for i, ref in enumerate(data.videos[start : start + batch_size], start):
            try:
                clip = decode_clip(ref.path, n, ref.where)
            except BadVideo as err:
                skipped[err.reason] += 1
                bad.append(str(err))
                continue
            skipped["short_video"] += clip.short
            clips.append(clip.frames)
            kept.append(i)
        if clips:
            embs.append(model.encode_video(clips, batch_size))
    if not kept:
        return {"n_videos": 0, "n_texts": 0, "skipped_videos": dict(skipped), "bad_videos": bad}
    position = {v: j for j, v in enumerate(kept)}
    texts = [j for j, v in enumerate(data.caption_video) if v in position]
    positives = torch.zeros(len(texts), len(kept), dtype=torch.bool)
    positives[torch.arange(len(texts)), torch.tensor([position[data.caption_video[j]] for j in texts])] = True
    out = video_retrieval_metrics(embed_text([data.captions[j] for j in texts]), torch.cat(embs), positives, ks)
    skipped = {k: v for k, v in skipped.items() if v}
    return {**out, "n_videos": len(kept), "n_texts": len(texts), "skipped_videos": skipped, "bad_videos": bad}
