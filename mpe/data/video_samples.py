"""Reading whole splits of video shards (the evaluation sets): each sample's video decoded into the model's
``num_frames`` frames. A sample whose video is empty or does not decode, or whose caption is empty, is left
out, counted by reason and named (shard and key); a clip shorter than ``num_frames`` is used (frames
repeat) and counted as ``short_video``."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image

from mpe.data.loader import shard_paths
from mpe.data.tar_stream import caption_of, iter_samples, video_of
from mpe.data.video_codec import BadVideo, decode_clip
from mpe.files import storage


@dataclass
class VideoSample:
    key: str
    frames: list[Image.Image]
    caption: str
    meta: dict = field(default_factory=dict)


@dataclass
class VideoSplit:
    samples: list[VideoSample]
    skipped: Counter  # by reason; "short_video" counts clips used with repeated frames
    bad: list[str]  # "<shard>: sample <key>: <why>" for every sample left out


def load_video_split(folder: str, num_frames: int) -> VideoSplit:
    """Every usable sample of a video split, in shard order."""
    out = VideoSplit([], Counter(), [])
    for shard in shard_paths(folder):
        for key, files in iter_samples(shard):
            where = f"{storage.name(shard)}: sample {key}"
            caption, video = caption_of(files), video_of(files)
            if video is None or not caption:
                reason = "no_video" if video is None else "empty_caption"
                out.skipped[reason] += 1
                out.bad.append(f"{where}: {reason}")
                continue
            try:
                clip = decode_clip(video, num_frames, where)
            except BadVideo as err:
                out.skipped[err.reason] += 1
                out.bad.append(str(err))
                continue
            if clip.short:
                out.skipped["short_video"] += 1
            meta = json.loads(files["json"]) if "json" in files else {}
            out.samples.append(VideoSample(key, clip.frames, caption, meta))
    return out
