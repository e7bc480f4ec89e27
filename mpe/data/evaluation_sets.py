"""The evaluation sets the data stage writes beside the shards, and every text they embed.

- ``shards/test/``: the retrieval test split (images and captions);
- ``negation.json``: ``[{"query": "a red circle and no blue square", "positive": id, "negative": id}]``,
  the two images in ``shards/negation/`` by their ``id``;
- ``zero_shot.json``: ``{task: {class name: [prompt texts]}}`` (the shapes world's main-object tasks);
- ``aspects.json``: ``[{"id", "caption", "variants": {aspect: caption with that aspect changed}}]`` for
  some test images (per-prompt analysis; empty unless ``data.shapes.aspect_probes``);
- ``shards/val/``: a validation split, when ``data.shapes.val_captions`` asks for one;
- ``benchmarks/``: the world's own compositional sets in SugarCrepe's, ARO's and Winoground's formats
  (``mpe.data.compositional_sets``; when ``data.shapes.benchmark_items`` asks for them), scored as the
  benchmarks ``shapes_sugarcrepe``, ``shapes_aro_relation``, ``shapes_aro_attribution``, ``shapes_winoground``.
"""

from __future__ import annotations

import json
from pathlib import Path

from mpe.config import AroBenchmark, SugarCrepeBenchmark, WinogroundBenchmark
from mpe.data.compositional_sets import (
    ARO_ATTRIBUTION,
    ARO_DIR,
    ARO_RELATION,
    SUGARCREPE_DIR,
    WINOGROUND_DIR,
    WINOGROUND_FILE,
)
from mpe.data.loader import split_captions
from mpe.files import storage

NEGATION_FILE = "negation.json"
ZERO_SHOT_FILE = "zero_shot.json"
ASPECTS_FILE = "aspects.json"
BENCHMARKS_DIR = "benchmarks"


def _read_json(url: str, default):
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else default


def negation_queries(data_root: str | Path) -> list[dict]:
    return _read_json(storage.join(data_root, NEGATION_FILE), [])


def zero_shot_tasks(data_root: str | Path) -> dict[str, dict[str, list[str]]]:
    return _read_json(storage.join(data_root, ZERO_SHOT_FILE), {})


def aspect_probes(data_root: str | Path) -> list[dict]:
    return _read_json(storage.join(data_root, ASPECTS_FILE), [])


def world_benchmarks(data_root: str | Path) -> list:
    """The benchmark configs of the world's own compositional sets that the data stage wrote (none for a URL
    list): the same readers as a user's SugarCrepe, ARO and Winoground copies."""
    root = Path(str(data_root)) / BENCHMARKS_DIR
    test_images = str(Path(str(data_root)) / "raw" / "test")
    out = []
    if (root / SUGARCREPE_DIR).is_dir():
        out.append(
            SugarCrepeBenchmark(
                name="shapes_sugarcrepe", kind="sugarcrepe", path=str(root / SUGARCREPE_DIR), image_root=test_images
            )
        )
    for name, kind, file in (
        ("shapes_aro_relation", "aro_vg_relation", ARO_RELATION),
        ("shapes_aro_attribution", "aro_vg_attribution", ARO_ATTRIBUTION),
    ):
        if (root / ARO_DIR / file).is_file() and json.loads((root / ARO_DIR / file).read_text()):
            out.append(AroBenchmark(name=name, kind=kind, path=str(root / ARO_DIR / file), image_root=test_images))
    wino = root / WINOGROUND_DIR / WINOGROUND_FILE
    if wino.is_file() and wino.read_text().strip():
        out.append(WinogroundBenchmark(name="shapes_winoground", kind="winoground", path=str(wino)))
    return out


def _world_benchmark_texts(data_root: str | Path) -> list[str]:
    root = Path(str(data_root)) / BENCHMARKS_DIR
    texts = []
    for file in sorted((root / SUGARCREPE_DIR).glob("*.json")):
        items = json.loads(file.read_text()).values()
        texts += [t for item in items for t in (item["caption"], item["negative_caption"])]
    for file in (ARO_RELATION, ARO_ATTRIBUTION):
        if (root / ARO_DIR / file).is_file():
            items = json.loads((root / ARO_DIR / file).read_text())
            texts += [t for item in items for t in (item["true_caption"], item["false_caption"])]
    wino = root / WINOGROUND_DIR / WINOGROUND_FILE
    if wino.is_file():
        lines = [json.loads(line) for line in wino.read_text().splitlines() if line.strip()]
        texts += [t for item in lines for t in (item["caption_0"], item["caption_1"])]
    return texts


def evaluation_texts(data_root: str | Path) -> list[str]:
    """Every text the evaluation embeds: test (and val) captions, negation queries, zero-shot prompts,
    aspect variants, the world's compositional sets."""
    texts = split_captions(storage.join(data_root, "shards", "test"))
    val = storage.join(data_root, "shards", "val")
    if storage.list_files(val, ".tar"):
        texts += split_captions(val)
    texts += [q["query"] for q in negation_queries(data_root)]
    texts += [p for classes in zero_shot_tasks(data_root).values() for ps in classes.values() for p in ps]
    texts += [v for probe in aspect_probes(data_root) for v in probe["variants"].values()]
    texts += _world_benchmark_texts(data_root)
    return texts
