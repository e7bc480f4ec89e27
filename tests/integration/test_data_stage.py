"""The data stage for real: shapes rendered to files, file:// URL lists, img2dataset shards, stats."""

import json

import pandas as pd

from mpe.data.canonical_shards import is_canonical
from mpe.data.loader import load_split, split_captions
from mpe.data.shapes import COLOURS, SHAPES


def test_every_split_downloaded_by_img2dataset(project):
    root, params = project
    stats = json.loads((root / "data" / "stats.json").read_text())
    # val_captions: 0 writes no val split; video_test: the moving-shapes test clips (zero-shot video retrieval)
    assert set(stats["splits"]) == {"train", "test", "negation", "video_test"}
    for split, s in stats["splits"].items():
        assert s["success_rate"] == 1.0 and s["status"] == {"success": s["count"]}
        folder = root / "data" / "shards" / split
        assert list(folder.glob("*.tar")) and list(folder.glob("*_stats.json")) and list(folder.glob("*.parquet"))
        assert all(is_canonical(t) for t in folder.glob("*.tar"))  # key order, whatever the threads did
    urls = pd.read_parquet(root / "data" / "url_lists" / "train.parquet")
    assert list(urls.columns[:2]) == ["URL", "TEXT"] and urls["URL"].str.startswith("file:").all()
    assert stats["splits"]["train"]["count"] == 48 * 2


def test_held_out_pairs_never_in_training_and_present_in_test(project):
    root, _ = project
    held = [tuple(p) for p in json.loads((root / "data" / "held_out_pairs.json").read_text())]
    assert held
    train = split_captions(root / "data" / "shards" / "train")
    for colour, shape in held:
        assert not any(f"{colour} {shape}" in c for c in train)
    test, skipped = load_split(root / "data" / "shards" / "test")
    assert not skipped
    comp = [s for s in test if s.meta["compositional"]]
    assert comp and all((s.meta["main_colour"], s.meta["main_shape"]) in held for s in comp)
    assert all(s.meta["main_colour"] in COLOURS and s.meta["main_shape"] in SHAPES for s in test)
    assert not set(train) & {s.caption for s in test}


def test_each_image_carries_its_scene_for_the_linear_probes(project):
    from mpe.data.shapes import parse_caption

    root, _ = project
    test, _ = load_split(root / "data" / "shards" / "test")
    for s in test:
        scene = parse_caption(s.caption)
        assert (s.meta["main_size"], s.meta["main_position"], s.meta["background"]) == (
            scene.main.size,
            scene.position,
            scene.background,
        )
        assert s.meta["relation"] == (scene.relation or "none")
    # the cache stage's dependency: never an empty folder (DVC keeps none), its sets listed
    assert json.loads((root / "data" / "benchmarks" / "sets.json").read_text()) == sorted(
        p.name for p in (root / "data" / "benchmarks").iterdir() if p.is_dir()
    )


def test_negation_pairs_differ_only_in_the_negated_object(project):
    import numpy as np

    root, _ = project
    queries = json.loads((root / "data" / "negation.json").read_text())
    images = {
        s.meta["id"]: np.asarray(s.image, dtype=float) for s in load_split(root / "data" / "shards" / "negation")[0]
    }
    for q in queries:
        a, b = images[q["positive"]], images[q["negative"]]
        changed = (np.abs(a - b).sum(-1) > 60).mean()
        assert 0 < changed < 0.4, q  # same background and main object; only the extra object differs
        assert " and no " in q["query"]
