"""Reading the webdataset shards img2dataset wrote: whole splits for evaluation, per-rank streams for
training. Bad samples (undecodable image, empty caption) are skipped and counted, never fatal."""

from __future__ import annotations

import io
import itertools
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


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


def rank_splitter(rank: int, world_size: int):
    """A webdataset ``nodesplitter`` taking every ``world_size``-th shard from ``rank`` on: what
    ``webdataset.split_by_node`` does, with the rank given explicitly (Ray Train's context)."""
    return lambda src: itertools.islice(src, rank, None, world_size)


def decode(key: str, files: dict, skipped: Counter) -> Sample | None:
    """A :class:`Sample` from a group of files, or None (counted in ``skipped``) if it is unusable."""
    ext = next((e for e in IMAGE_EXTS if e in files), None)
    if ext is None:
        skipped["no_image"] += 1
        return None
    caption = files.get("txt", b"").decode("utf-8", errors="replace").strip()
    if not caption:
        skipped["empty_caption"] += 1
        return None
    try:
        with Image.open(io.BytesIO(files[ext])) as im:
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
        text = raw.get("txt", b"").decode("utf-8", errors="replace").strip()
        if text:
            out.append(text)
    return out


def load_split(folder: str | Path) -> tuple[list[Sample], Counter]:
    """Every usable sample of a split, in shard order, and the counts of what was skipped."""
    skipped: Counter = Counter()
    return list(iter_samples(shard_paths(folder), skipped)), skipped


def train_stream(folder: str | Path, rank: int, world_size: int, seed: int, skipped: Counter | None = None,
                 epoch: int = 0):
    """An endless per-rank stream of samples: this rank's shards (``rank_splitter``), reshuffled every
    pass, or — with fewer shards than ranks — every ``world_size``-th sample of all shards. Callers
    take a fixed number of batches per epoch, so every rank steps the same number of times (no DDP
    hang on uneven shards)."""
    shards = shard_paths(folder)
    by_sample = len(shards) < world_size
    skipped = Counter() if skipped is None else skipped
    rng = random.Random(seed * 1000 + rank)
    buffer: list[Sample] = []
    pass_ = epoch
    while True:
        order = list(shards)
        random.Random(seed + pass_).shuffle(order)  # the same order on every rank, then split
        splitter = None if by_sample else rank_splitter(rank, world_size)
        n = 0
        for i, s in enumerate(iter_samples(order, skipped, splitter)):
            if by_sample and i % world_size != rank:
                continue
            n += 1
            buffer.append(s)
            if len(buffer) >= 64:  # small shuffle buffer
                yield buffer.pop(rng.randrange(len(buffer)))
        if n == 0 and not buffer:
            raise RuntimeError(f"{folder}: rank {rank} has no usable samples ({dict(skipped)} skipped)")
        pass_ += 1
        rng.shuffle(buffer)
        while buffer:
            yield buffer.pop()
