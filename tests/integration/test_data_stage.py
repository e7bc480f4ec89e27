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


class _PixelEmbedder:
    """A fixed image embedding (the image at 4x4 pixels) that records the images it was given."""

    def __init__(self):
        self.seen: list[bytes] = []

    def encode_image(self, images):
        import numpy as np
        import torch

        self.seen += [im.tobytes() for im in images]
        return torch.tensor(np.stack([np.asarray(im.resize((4, 4))).ravel() for im in images]), dtype=torch.float32)


def test_the_linear_probes_are_fitted_on_a_fixed_sample_of_the_training_images(project):
    from mpe.evaluation.linear_probe import probe_aspects
    from mpe.evaluation.tasks import linear_probes

    root, _ = project
    data = root / "data"
    test, _ = load_split(data / "shards" / "test")
    train, _ = load_split(data / "shards" / "train")
    test_emb = _PixelEmbedder().encode_image([s.image for s in test])
    pixels = {s.image.tobytes(): s for s in train}  # an image drawn twice is one key: the same scene
    every = sorted(s.image.tobytes() for s in train)

    def probes(n, seed):
        model = _PixelEmbedder()
        return linear_probes(model, data, test, test_emb, n, seed), model.seen

    whole, seen = probes(len(train) + 5, 0)  # more than the split holds: every training image, once
    assert sorted(seen) == every
    test_meta = [s.meta for s in test]
    brute = probe_aspects(
        _PixelEmbedder().encode_image([s.image for s in train]), [s.meta for s in train], test_emb, test_meta
    )
    assert whole == brute and "probe_shape" in whole
    a, seen_a = probes(40, 7)
    b, seen_b = probes(40, 7)
    _, seen_c = probes(40, 8)
    assert len(seen_a) == 40 and set(seen_a) <= set(pixels)  # 40 of the training images
    assert all(seen_a.count(p) <= every.count(p) for p in seen_a)  # none taken twice
    assert seen_a == seen_b and a == b  # the same seed, the same images and figures: models are probed alike
    assert set(seen_c) != set(seen_a)
    sample = [pixels[p] for p in seen_a]
    assert a == probe_aspects(
        _PixelEmbedder().encode_image([s.image for s in sample]), [s.meta for s in sample], test_emb, test_meta
    )
    assert probes(0, 0) == ({}, [])  # 0: no probes, nothing embedded
