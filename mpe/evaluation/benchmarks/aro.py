"""ARO's Visual Genome sets (Yuksekgonul et al. 2023): ``visual_genome_relation.json`` and
``visual_genome_attribution.json``, each a list of ``{"image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h",
"true_caption", "false_caption"}`` with ``relation_name`` (VG-Relation) or ``attributes`` (VG-Attribution, two
attributes); the image is cropped to its box. The groups of the macro accuracy are the relations and the
attribute pairs (``<first>_<second>``)."""

from __future__ import annotations

import json
from pathlib import Path

from mpe.config import AroBenchmark
from mpe.errors import DataError
from mpe.evaluation.benchmarks.sets import CaptionPairSet, ImageRef, require

LAYOUT = (
    "ARO's JSON list of {image_path, bbox_x, bbox_y, bbox_w, bbox_h, true_caption, false_caption} with "
    "relation_name (VG-Relation) or attributes [a, b] (VG-Attribution), images under image_root "
    "(default <json folder>/images)"
)
BOX = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")


def _group(item: dict, relation: bool, where: str) -> str:
    if relation:
        name = item.get("relation_name")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{where}: missing key 'relation_name' (VG-Relation)")
        return name.strip()
    attrs = item.get("attributes")
    if not isinstance(attrs, list) or len(attrs) != 2 or not all(isinstance(a, str) for a in attrs):
        raise DataError(f"{where}: 'attributes' must be a list of two attribute names (VG-Attribution)")
    return f"{attrs[0]}_{attrs[1]}"


def read(cfg: AroBenchmark) -> CaptionPairSet:
    path = require(Path(cfg.path), LAYOUT)
    root = require(Path(cfg.image_root) if cfg.image_root else path.parent / "images", LAYOUT, folder=True)
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON: {err}; expected {LAYOUT}") from None
    if not isinstance(items, list) or not items:
        raise DataError(f"{path}: expected a non-empty list of items; {LAYOUT}")
    relation = cfg.kind == "aro_vg_relation"
    out = CaptionPairSet(
        [], [], [], [], per_group=False, min_group_count=cfg.min_group_count, exclude_groups=tuple(cfg.exclude_groups)
    )
    checked: set[Path] = set()
    for i, item in enumerate(items):
        where = f"{path}: item {i}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: not an object; expected {LAYOUT}")
        missing = [k for k in ("image_path", "true_caption", "false_caption", *BOX) if k not in item]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing}")
        try:
            x, y, w, h = (float(item[k]) for k in BOX)
        except (TypeError, ValueError):
            raise DataError(f"{where}: the box {[item[k] for k in BOX]} is not four numbers") from None
        if w <= 0 or h <= 0:
            raise DataError(f"{where}: the box has no area (bbox_w {w}, bbox_h {h})")
        captions = [item["true_caption"], item["false_caption"]]
        if not all(isinstance(c, str) and c.strip() for c in captions):
            raise DataError(f"{where}: empty true_caption or false_caption")
        file = root / item["image_path"]
        ref = ImageRef(f"{where} ({file})", path=file, box=(x, y, x + w, y + h))
        if file not in checked:
            ref.check()
            checked.add(file)
        out.images.append(ref)
        out.captions.append(captions[0].strip())
        out.negatives.append(captions[1].strip())
        out.groups.append(_group(item, relation, where))
    return out
