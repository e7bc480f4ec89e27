"""Flickr30k / MSCOCO in Karpathy's split file (``dataset_flickr30k.json``, ``dataset_coco.json``): one
entry per image with ``filename`` (COCO adds ``filepath``, e.g. ``val2014``), ``split`` and
``sentences[].raw``; the images lie in a folder beside it."""

from __future__ import annotations

import json
from pathlib import Path

from mpe.config import KarpathyBenchmark
from mpe.errors import DataError
from mpe.evaluation.benchmarks.sets import ImageRef, RetrievalSet, require

LAYOUT = (
    "Karpathy's JSON ({'images': [{'filename', 'split', 'sentences': [{'raw'}], COCO also 'filepath'}]}) "
    "and an image folder (image_root, default the JSON's folder) holding [filepath/]filename"
)


def read(cfg: KarpathyBenchmark) -> RetrievalSet:
    """The images of ``cfg.split`` and all their captions (every image file checked to open)."""
    path = require(Path(cfg.path), LAYOUT)
    root = require(Path(cfg.image_root) if cfg.image_root else path.parent, LAYOUT, folder=True)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON: {err}; expected {LAYOUT}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: no 'images' list at the top level; expected {LAYOUT}")
    out = RetrievalSet([], [], [])
    splits = set()
    for i, entry in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: not an object; expected {LAYOUT}")
        for key in ("filename", "split", "sentences"):
            if key not in entry:
                raise DataError(f"{where}: missing key '{key}'")
        splits.add(entry["split"])
        if entry["split"] != cfg.split:
            continue
        captions = []
        for j, sentence in enumerate(entry["sentences"]):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if not isinstance(raw, str) or not raw.strip():
                raise DataError(f"{where}.sentences[{j}]: missing key 'raw' (or it is empty)")
            captions.append(raw.strip())
        if not captions:
            raise DataError(f"{where}: no sentences (an image needs at least one caption)")
        file = root / entry.get("filepath", "") / entry["filename"]
        out.add(ImageRef(f"{where} ({file})", path=file), captions)
    if not out.images:
        raise DataError(f"{path}: no image has split '{cfg.split}' (splits present: {sorted(map(str, splits))})")
    return out
