"""Reading whole splits of webdataset shards (the evaluation sets), through ``mpe.files.storage`` (a folder or
any fsspec URL); training streams through ``mpe.data.train_stream``. Bad samples (undecodable image,
empty caption) are skipped and counted, never fatal."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mpe.data.tar_stream import caption_of, captions, image_of
from mpe.data.tar_stream import iter_samples as iter_tar
from mpe.files import storage


@dataclass
class Sample:
    key: str
    image: Image.Image
    caption: str
    meta: dict = field(default_factory=dict)


def shard_paths(folder: str | Path) -> list[str]:
    shards = storage.list_files(str(folder), ".tar")
    if not shards:
        raise FileNotFoundError(f"{folder}: no webdataset shards (*.tar); run `mpe data` first")
    return shards


def decode(key: str, files: dict, skipped: Counter) -> Sample | None:
    """A :class:`Sample` from a group of files, or None (counted in ``skipped``) if it is unusable."""
    image = image_of(files)
    if image is None:
        skipped["no_image"] += 1
        return None
    caption = caption_of(files)
    if not caption:
        skipped["empty_caption"] += 1
        return None
    try:
        with Image.open(io.BytesIO(image)) as im:
            im.load()
            image = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError):
        skipped["bad_image"] += 1
        return None
    meta = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except ValueError:
            skipped["bad_json"] += 1
    return Sample(key, image, caption, meta)


def iter_samples(shards: list[str], skipped: Counter | None = None):
    """Decoded samples of ``shards``, in order; an unreadable shard is counted and skipped."""
    skipped = Counter() if skipped is None else skipped
    for shard in shards:
        try:
            for key, files in iter_tar(shard):
                s = decode(key, files, skipped)
                if s is not None:
                    yield s
        except (tarfile.TarError, OSError, EOFError) as err:
            skipped[f"unreadable:{type(err).__name__}"] += 1


def split_captions(folder: str | Path) -> list[str]:
    """The non-empty captions of a split, in shard order (images left unread)."""
    return [text for shard in shard_paths(folder) for _, text in captions(shard)]


def load_split(folder: str | Path) -> tuple[list[Sample], Counter]:
    """Every usable sample of a split, in shard order, and the counts of what was skipped."""
    skipped: Counter = Counter()
    return list(iter_samples(shard_paths(folder), skipped)), skipped
