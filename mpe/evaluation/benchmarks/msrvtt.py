"""MSR-VTT text↔video retrieval from the files its users have: the test CSV (the 1k-A split everyone quotes,
``MSRVTT_JSFUSION_test.csv``, columns ``key``, ``vid_key``, ``video_id``, ``sentence``: one row per
caption, one caption per video in 1k-A) and the folder of videos, ``<video_root>/<video_id>.mp4``
(``.webm`` where that is what lies there, as CLIP4Clip's loader accepts).

Every row and every file's presence is checked before any model loads (a missing video fails naming the
row and the path); a video that is empty or does not decode is counted and named in the result and left
out with its captions, never a crash of the run."""

from __future__ import annotations

import csv
from pathlib import Path

from mpe.config import MsrvttBenchmark
from mpe.errors import DataError
from mpe.evaluation.benchmarks.sets import require
from mpe.evaluation.benchmarks.video_sets import VideoRef, VideoRetrievalSet

LAYOUT = (
    "MSR-VTT's test CSV (MSRVTT_JSFUSION_test.csv: columns key, vid_key, video_id, sentence; one row per "
    "caption) and video_root holding <video_id>.mp4"
)
REQUIRED = ("video_id", "sentence")


def read(cfg: MsrvttBenchmark) -> VideoRetrievalSet:
    path = require(Path(cfg.path), LAYOUT)
    root = require(Path(cfg.video_root), LAYOUT, folder=True)
    out = VideoRetrievalSet([], [], [])
    index: dict[str, int] = {}
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(
                    f"{path}: missing column(s) {missing} (columns: {reader.fieldnames}); expected {LAYOUT}"
                )
            for i, row in enumerate(reader):
                where = f"{path}: row {i + 1} (line {reader.line_num})"
                video_id, sentence = (row["video_id"] or "").strip(), (row["sentence"] or "").strip()
                if not video_id or not sentence:
                    raise DataError(f"{where}: empty {'video_id' if not video_id else 'sentence'}")
                if video_id not in index:
                    file = root / f"{video_id}.mp4"
                    if not file.is_file() and (root / f"{video_id}.webm").is_file():
                        file = root / f"{video_id}.webm"
                    if not file.is_file():
                        raise DataError(f"{where}: video file not found: {file}")
                    index[video_id] = len(out.videos)
                    out.videos.append(VideoRef(f"{where} ({file})", file))
                out.captions.append(sentence)
                out.caption_video.append(index[video_id])
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); expected {LAYOUT}") from None
    if not out.videos:
        raise DataError(f"{path}: no rows; expected {LAYOUT}")
    return out
