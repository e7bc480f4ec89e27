"""Reading whole splits of the webdataset shards img2dataset wrote (evaluation sets); training streams
through ``mpe.data.train_stream``. Bad samples (undecodable image, empty caption) are skipped and
counted, never fatal."""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mpe.data.tar_stream import caption_of, image_of


@dataclass
class Sample:
    key: str
    image: Image.Image
    caption: str
    meta: dict = field(default_factory=dict)


def shard_paths(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    shards = sorted(folder.glob("*.tar"))
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


def _counting_handler(skipped: Counter):
    def handler(exn: Exception) -> bool:
        skipped[f"unreadable:{type(exn).__name__}"] += 1
        return True  # skip the broken member or shard and go on
    return handler


def iter_samples(shards: list[Path], skipped: Counter | None = None, nodesplitter=None):
    """Decoded samples of ``shards`` read with webdataset, in order.

    ``nodesplitter`` picks this rank's shards (``webdataset.split_by_node`` under torch.distributed,
    or an explicit ``islice`` by rank); by default every shard is read.
    """
    import webdataset as wds

    skipped = Counter() if skipped is None else skipped
    ds = wds.WebDataset([str(s) for s in shards], shardshuffle=False, empty_check=False,
                        nodesplitter=nodesplitter or (lambda src: src), workersplitter=None,
                        handler=_counting_handler(skipped))
    for raw in ds:
        files = {k.lower(): v for k, v in raw.items() if not k.startswith("__")}
        s = decode(raw["__key__"], files, skipped)
        if s is not None:
            yield s


def split_captions(folder: str | Path) -> list[str]:
    """The non-empty captions of a split, read from the shards' ``.txt`` members only."""
    import webdataset as wds

    skipped: Counter = Counter()
    ds = wds.WebDataset([str(s) for s in shard_paths(folder)], shardshuffle=False, empty_check=False,
                        nodesplitter=lambda src: src, workersplitter=None, handler=_counting_handler(skipped),
                        select_files=lambda name: name.endswith(".txt"))
    out = []
    for raw in ds:
        text = caption_of(raw)
        if text:
            out.append(text)
    return out


def load_split(folder: str | Path) -> tuple[list[Sample], Counter]:
    """Every usable sample of a split, in shard order, and the counts of what was skipped."""
    skipped: Counter = Counter()
    return list(iter_samples(shard_paths(folder), skipped)), skipped
