"""The evaluation sets the data stage writes beside the shards, and every text they embed.

- ``shards/test/``: the retrieval test split (images and captions);
- ``negation.json``: ``[{"query": "a red circle and no blue square", "positive": id, "negative": id}]``,
  the two images in ``shards/negation/`` by their ``id``;
- ``zero_shot.json``: ``{task: {class name: [prompt texts]}}`` (the shapes world's main-object tasks);
- ``aspects.json``: ``[{"id", "caption", "variants": {aspect: caption with that aspect changed}}]`` for
  some test images (per-prompt analysis; empty unless ``data.shapes.aspect_probes``);
- ``shards/val/``: a validation split, when ``data.shapes.val_captions`` asks for one;
- ``shards/video_test/``: the moving-shapes test clips beside an image world (zero-shot video retrieval).
"""

from __future__ import annotations

import json
from pathlib import Path

from mpe.data.loader import split_captions
from mpe.files import storage

NEGATION_FILE = "negation.json"
ZERO_SHOT_FILE = "zero_shot.json"
ASPECTS_FILE = "aspects.json"


def _read_json(url: str, default):
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else default


def negation_queries(data_root: str | Path) -> list[dict]:
    return _read_json(storage.join(data_root, NEGATION_FILE), [])


def zero_shot_tasks(data_root: str | Path) -> dict[str, dict[str, list[str]]]:
    return _read_json(storage.join(data_root, ZERO_SHOT_FILE), {})


def aspect_probes(data_root: str | Path) -> list[dict]:
    return _read_json(storage.join(data_root, ASPECTS_FILE), [])


def evaluation_texts(data_root: str | Path) -> list[str]:
    """Every text the evaluation embeds: test (and val, video test) captions, negation queries, zero-shot
    prompts, aspect variants."""
    texts = split_captions(storage.join(data_root, "shards", "test"))
    for extra in ("val", "video_test"):
        folder = storage.join(data_root, "shards", extra)
        if storage.list_files(folder, ".tar"):
            texts += split_captions(folder)
    texts += [q["query"] for q in negation_queries(data_root)]
    texts += [p for classes in zero_shot_tasks(data_root).values() for ps in classes.values() for p in ps]
    texts += [v for probe in aspect_probes(data_root) for v in probe["variants"].values()]
    return texts
