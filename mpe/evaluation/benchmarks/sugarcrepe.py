"""SugarCrepe as it ships (Hsieh et al. 2023): a folder of per-category JSON files (``add_att.json``,
``replace_obj.json``, ``swap_att.json`` …), each ``{id: {"filename", "caption", "negative_caption"}}``, the
filenames relative to an image folder (COCO val2017). Every ``*.json`` in the folder is a category, named by
its file."""

from __future__ import annotations

import json
from pathlib import Path

from mpe.config import SugarCrepeBenchmark
from mpe.errors import DataError
from mpe.evaluation.benchmarks.negbench import metric_word
from mpe.evaluation.benchmarks.sets import CaptionPairSet, ImageRef, require

LAYOUT = (
    "SugarCrepe's folder of per-category JSON files (<category>.json), each "
    '{id: {"filename", "caption", "negative_caption"}}, and image_root holding the filenames'
)
FIELDS = ("filename", "caption", "negative_caption")


def read(cfg: SugarCrepeBenchmark) -> CaptionPairSet:
    """Every item of every category, in file and id order; each image file checked once."""
    root = require(Path(cfg.path), LAYOUT, folder=True)
    images_root = require(Path(cfg.image_root), LAYOUT, folder=True)
    files = sorted(root.glob("*.json"))
    if not files:
        raise DataError(f"{root}: no *.json category file; expected {LAYOUT}")
    out = CaptionPairSet([], [], [], [])
    refs: dict[str, ImageRef] = {}
    for file in files:
        category = metric_word(file.stem)
        if category is None:
            raise DataError(f"{file}: the file name gives no category name")
        try:
            items = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{file}: not valid JSON: {err}; expected {LAYOUT}") from None
        if not isinstance(items, dict) or not items:
            raise DataError(f"{file}: expected a non-empty object {{id: item}}; {LAYOUT}")
        for key, item in items.items():
            where = f"{file}: item {key!r}"
            if not isinstance(item, dict):
                raise DataError(f"{where}: not an object")
            bad = [f for f in FIELDS if not isinstance(item.get(f), str) or not item[f].strip()]
            if bad:
                raise DataError(f"{where}: missing or empty {bad}")
            name = item["filename"]
            if name not in refs:
                refs[name] = ImageRef(f"{where} ({images_root / name})", path=images_root / name)
                refs[name].check()
            out.images.append(refs[name])
            out.captions.append(item["caption"].strip())
            out.negatives.append(item["negative_caption"].strip())
            out.groups.append(category)
    return out
