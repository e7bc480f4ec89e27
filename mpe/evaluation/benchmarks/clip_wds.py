"""CLIP_benchmark's webdataset layout for retrieval (what ``clip_benchmark_export_wds`` writes):
``<root>/dataset_type.txt`` holding ``retrieval``, ``<root>/<split>/nshards.txt`` holding N, and shards
``<root>/<split>/0.tar`` … ``N-1.tar``; each sample is one image (``.webp``/``.png``/``.jpg``/``.jpeg``)
and a ``.txt`` with its captions, one per line."""

from __future__ import annotations

from pathlib import Path

from mpe.config import ClipBenchmarkWds
from mpe.data.tar_stream import image_of, iter_samples
from mpe.errors import DataError
from mpe.evaluation.benchmarks.sets import ImageRef, RetrievalSet, require

LAYOUT = (
    "CLIP_benchmark's webdataset layout: <path>/dataset_type.txt ('retrieval'), <path>/<split>/nshards.txt "
    "(N) and <path>/<split>/0.tar … N-1.tar, each sample an image (.webp/.png/.jpg/.jpeg) and a .txt of "
    "captions, one per line"
)


def read(cfg: ClipBenchmarkWds) -> RetrievalSet:
    """Every sample of ``cfg.split`` in shard order; the image bytes are held, decoded when embedded."""
    root = require(Path(cfg.path), LAYOUT, folder=True)
    kind_file = root / "dataset_type.txt"
    if kind_file.is_file() and kind_file.read_text().strip().lower() != "retrieval":
        raise DataError(
            f"{kind_file}: dataset type '{kind_file.read_text().strip()}', expected 'retrieval' "
            "(for zero-shot classification use kind image_folder)"
        )
    count = require(root / cfg.split / "nshards.txt", LAYOUT)
    try:
        n = int(count.read_text().strip())
    except ValueError:
        raise DataError(f"{count}: not a shard count: {count.read_text()[:40]!r}") from None
    shards = [require(root / cfg.split / f"{i}.tar", LAYOUT) for i in range(n)]
    out = RetrievalSet([], [], [])
    for shard in shards:
        for key, files in iter_samples(str(shard)):
            where = f"{shard}: sample '{key}'"
            image = image_of(files)
            if image is None:
                raise DataError(f"{where}: no image (.webp/.png/.jpg/.jpeg); members {sorted(files)}")
            if "txt" not in files:
                raise DataError(f"{where}: no .txt of captions")
            try:
                captions = [c.strip() for c in files["txt"].decode("utf-8").splitlines() if c.strip()]
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: .txt is not UTF-8 ({err.reason} at byte {err.start})") from None
            if not captions:
                raise DataError(f"{where}: the .txt holds no caption")
            out.add(ImageRef(where, data=image), captions)
    if not out.images:
        raise DataError(f"{root / cfg.split}: the shards hold no sample; expected {LAYOUT}")
    return out
