"""Winoground (Thrush et al. 2022): ``examples.jsonl``, one JSON object per line with ``id``, ``image_0``,
``image_1``, ``caption_0``, ``caption_1`` (and tags, not used), the images ``<image_root>/<image_i>.png`` (as
``images.zip`` unpacks). Caption ``i`` describes image ``i``; the two captions hold the same words in another
order."""

from __future__ import annotations

import json
from pathlib import Path

from mpe.config import WinogroundBenchmark
from mpe.errors import DataError
from mpe.evaluation.benchmarks.sets import ImageRef, WinogroundSet, require

LAYOUT = (
    "Winoground's examples.jsonl (one object per line: id, image_0, image_1, caption_0, caption_1) and the "
    "images <image_root>/<image_0>.png (default image_root: <jsonl folder>/images)"
)
FIELDS = ("image_0", "image_1", "caption_0", "caption_1")


def _image_file(root: Path, name: str) -> Path:
    """``<root>/<name>.png`` as Winoground names its images; a name that already is a file name is kept."""
    given = root / name
    return given if given.suffix and given.is_file() else root / f"{name}.png"


def read(cfg: WinogroundBenchmark) -> WinogroundSet:
    path = require(Path(cfg.path), LAYOUT)
    root = require(Path(cfg.image_root) if cfg.image_root else path.parent / "images", LAYOUT, folder=True)
    out = WinogroundSet([], [])
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {n}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON: {err}") from None
            if not isinstance(item, dict):
                raise DataError(f"{where}: not an object; expected {LAYOUT}")
            bad = [k for k in FIELDS if not isinstance(item.get(k), str) or not item[k].strip()]
            if bad:
                raise DataError(f"{where}: missing or empty {bad}")
            refs = []
            for k in ("image_0", "image_1"):
                file = _image_file(root, item[k])
                ref = ImageRef(f"{where} ({file})", path=file)
                ref.check()
                refs.append(ref)
            out.images.append((refs[0], refs[1]))
            out.captions.append((item["caption_0"].strip(), item["caption_1"].strip()))
    if not out.images:
        raise DataError(f"{path}: no examples")
    return out
