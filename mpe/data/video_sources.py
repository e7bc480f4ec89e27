"""The data stage's video sources, each written as video webdataset shards (``mpe.data.video_shards``) under
``<out>/shards/<split>``:

- ``video_shapes``: the synthetic moving-shapes world, rendered and encoded to mp4 (``train``, ``test``);
  with an image source, its test pairs alone as ``video_test`` (zero-shot video retrieval of the image model);
- ``video_folder``: a folder of videos and a CSV of ``video,caption`` rows;
- ``video_webdataset``: shards video2dataset wrote elsewhere (``.mp4`` + ``.txt`` + ``.json`` per sample).

The last two are split into train and test by a hash of the video's name (``data.test_fraction``, the URL
list's rule), so a clip never changes split; their videos are copied as they are (decoded only when read).
A video that is missing or empty is counted (``status_dict``) and named, never written into a shard.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from mpe.config import DataConfig, VideoShapesConfig
from mpe.data.tar_stream import caption_of, iter_samples, video_of
from mpe.data.url_list import evaluation_rows
from mpe.data.video_codec import VIDEO_EXTS, encode_mp4
from mpe.data.video_shapes import plan_video_splits, render_clip
from mpe.data.video_shards import VideoRecord, write_video_shards
from mpe.errors import DataError
from mpe.files.atomic import write_text
from mpe.files.hashing import fingerprint


def _shapes_records(cfg: VideoShapesConfig, size: int, seed: int, split: str) -> Iterator[VideoRecord]:
    # the whole plan every time: the test pairs are drawn after (and apart from) the training captions, so an
    # image world's video_test is the video world's test split
    plan = plan_video_splits(cfg.train_captions, cfg.test_pairs, seed)
    if split == "train":
        for i, scene in enumerate(plan.train):
            for j in range(cfg.clips_per_caption):
                frames = render_clip(scene, size, cfg.frames, seed * 1_000_003 + i * 31 + j)
                meta = {"id": f"train-{i:05d}-{j}", "motion": scene.motion}
                yield VideoRecord(encode_mp4(frames, cfg.fps, lossless=True), scene.caption(), meta)
        return
    for p, scene in enumerate(plan.test_pairs):
        frames = render_clip(scene, size, cfg.frames, seed + 8_000_000 + p)
        for d, (s, fr) in enumerate(((scene, frames), (scene.reversed(), frames[::-1]))):
            meta = {"id": f"test-{p:05d}-{d}", "pair": p, "motion": s.motion}
            # lossless: a clip and its reverse decode to the very same frames (mean pooling exactly at chance)
            yield VideoRecord(encode_mp4(fr, cfg.fps, lossless=True), s.caption(), meta)


def write_video_world(cfg: DataConfig, seed: int, out: Path, splits: dict[str, str]) -> list[str]:
    """The moving-shapes world's ``{folder name: world split}`` (``{"train": "train", "test": "test"}``, or
    ``{"video_test": "test"}`` beside an image world); a folder written from the same inputs is kept."""
    for folder, split in splits.items():
        target = out / "shards" / folder
        fp = fingerprint({"video_shapes": cfg.video.shapes.model_dump(mode="json"), "size": cfg.image_size,
                          "seed": seed, "split": split, "per_shard": cfg.samples_per_shard})  # fmt: skip
        marker = target / ".fingerprint"
        if marker.exists() and marker.read_text() == fp and any(target.glob("*_stats.json")):
            continue
        shutil.rmtree(target, ignore_errors=True)
        records = tqdm(_shapes_records(cfg.video.shapes, cfg.image_size, seed, split), desc=f"render {folder} clips")
        write_video_shards(records, target, cfg.samples_per_shard)
        write_text(marker, fp)
    return list(splits)


def _folder_records(cfg: DataConfig) -> list[tuple[str, VideoRecord]]:
    folder, table = Path(cfg.video.folder), Path(cfg.video.captions)
    if not folder.is_dir():
        raise DataError(f"{folder}: data.video.folder is not a folder of videos")
    if not table.is_file():
        raise DataError(f"{table}: data.video.captions not found (a CSV with columns video, caption)")
    out = []
    with table.open(newline="", encoding=cfg.encoding) as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("video", "caption") if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{table}: missing column(s) {missing} (columns: {reader.fieldnames})")
        for i, row in enumerate(reader):
            name, caption = (row["video"] or "").strip(), (row["caption"] or "").strip()
            path = folder / name
            if not name or not caption:
                raise DataError(f"{table}: row {i + 1} (line {reader.line_num}): empty video or caption")
            meta = {"id": name, "source_row": i + 1}
            if not path.is_file():
                status = f"no such file: {path}"
            elif path.stat().st_size == 0:
                status = f"zero-length video: {path}"
            else:
                status = "success"
            video = path.read_bytes() if status == "success" else None
            out.append((name, VideoRecord(video, caption, meta, status, path.suffix.lstrip(".").lower() or "mp4")))
    return out


def _webdataset_records(cfg: DataConfig) -> list[tuple[str, VideoRecord]]:
    root = Path(cfg.video.webdataset)
    tars = sorted(root.glob("*.tar"))
    if not tars:
        raise DataError(f"{root}: no *.tar shards (video2dataset's webdataset output: <key>.mp4, .txt, .json)")
    out = []
    for tar in tars:
        for key, files in iter_samples(str(tar)):
            ext = next((e for e in VIDEO_EXTS if e in files), "mp4")
            video, caption = video_of(files), caption_of(files)
            status = "success" if video and caption else f"sample {key} of {tar.name}: no video or no caption"
            out.append((f"{tar.stem}/{key}", VideoRecord(video, caption, {"id": f"{tar.stem}/{key}"}, status, ext)))
    return out


def write_video_collection(cfg: DataConfig, out: Path) -> list[str]:
    """A user's videos (``video_folder`` or ``video_webdataset``) as train and test shards."""
    rows = _folder_records(cfg) if cfg.source == "video_folder" else _webdataset_records(cfg)
    if not rows:
        raise DataError(f"{cfg.video.captions or cfg.video.webdataset}: no videos listed")
    test = evaluation_rows(pd.Series([name for name, _ in rows]), cfg.test_fraction)
    for split, keep in (("train", ~test), ("test", test)):
        chosen = [rec for (_, rec), k in zip(rows, keep) if k]
        if not any(r.status == "success" for r in chosen):
            raise DataError(f"{cfg.video.captions or cfg.video.webdataset}: no usable video for the {split} split")
        write_video_shards(chosen, out / "shards" / split, cfg.samples_per_shard)
    return ["train", "test"]
