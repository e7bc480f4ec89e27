"""The shapes world's own compositional sets: files in SugarCrepe's, ARO's and Winoground's own layouts that
the readers take as they take the released sets, each negative of the kind its category names, Winoground's
two captions made of the same words, its two images drawn with the same placement."""

import json
from collections import Counter

from PIL import Image, ImageChops

from mpe.config import EvalConfig
from mpe.data import evaluation_sets
from mpe.data.compositional_sets import write_compositional_sets
from mpe.data.evaluation_sets import world_benchmarks
from mpe.data.shapes import parse_caption, plan_splits, render
from mpe.evaluation.benchmarks.scoring import read_benchmarks
from tests.unit.test_hard_negatives import facts


def _world(tmp_path, items=6):
    plan = plan_splits(40, 0, 30, 0, 6, 0.6, 0)
    raw = tmp_path / "raw" / "test"
    raw.mkdir(parents=True)
    files = []
    for i, scene in enumerate(plan.test):
        render(scene, 32, 8_000_000 + i).save(raw / f"test-{i:05d}.png")
        files.append(f"test-{i:05d}.png")
    counts = write_compositional_sets(tmp_path / "benchmarks", plan.test, files, items, 32, 0, lambda i: 8_000_000 + i)
    return plan, counts


def changed(a: str, b: str) -> set[str]:
    fa, fb = facts(parse_caption(a)), facts(parse_caption(b))
    return {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}


def test_sugarcrepe_categories_hold_the_change_they_name(tmp_path):
    _, counts = _world(tmp_path)
    root = tmp_path / "benchmarks" / "sugarcrepe"
    assert sorted(p.stem for p in root.glob("*.json")) == [
        "add_obj",
        "replace_att",
        "replace_obj",
        "replace_rel",
        "swap_att",
        "swap_obj",
    ]
    for file in root.glob("*.json"):
        items = json.loads(file.read_text())
        assert 0 < len(items) <= 6 and counts[f"sugarcrepe_{file.stem}"] == len(items)
        for item in items.values():
            assert set(item) == {"filename", "caption", "negative_caption"}
            assert (tmp_path / "raw" / "test" / item["filename"]).is_file()
            assert parse_caption(item["caption"]) and parse_caption(item["negative_caption"])
            diff = changed(item["caption"], item["negative_caption"])
            kind = file.stem
            if kind == "replace_att":
                assert len(diff) == 1 and diff.pop().endswith(".colour")
            elif kind == "replace_obj":
                assert len(diff) == 1 and diff.pop().endswith(".shape")
            elif kind == "replace_rel":
                assert diff in ({"relation"}, {"position"})
            elif kind == "swap_att":
                assert diff == {"main.colour", "secondary.colour"}
            elif kind == "swap_obj":
                assert diff == {"main.shape", "secondary.shape"}
            else:  # add_obj: the negative names an object the image does not hold
                assert parse_caption(item["caption"]).secondary is None
                assert parse_caption(item["negative_caption"]).secondary is not None


def test_aro_and_winoground_items_are_what_their_sets_test(tmp_path):
    plan, _ = _world(tmp_path)
    relation = json.loads((tmp_path / "benchmarks" / "aro" / "visual_genome_relation.json").read_text())
    for item in relation:
        true, false = parse_caption(item["true_caption"]), parse_caption(item["false_caption"])
        assert (false.main, false.secondary, false.relation) == (true.secondary, true.main, true.relation)
        assert item["relation_name"] == true.relation and item["bbox_w"] == item["bbox_h"] == 32
    attribution = json.loads((tmp_path / "benchmarks" / "aro" / "visual_genome_attribution.json").read_text())
    for item in attribution:
        assert changed(item["true_caption"], item["false_caption"]) == {"main.colour", "secondary.colour"}
        assert item["attributes"] == [
            parse_caption(item["true_caption"]).main.colour,
            parse_caption(item["true_caption"]).secondary.colour,
        ]
    lines = (tmp_path / "benchmarks" / "winoground" / "examples.jsonl").read_text().splitlines()
    assert lines and {json.loads(x)["tag"] for x in lines} == {"swap_colour", "swap_shape", "swap_objects"}
    for line in lines:
        ex = json.loads(line)
        assert Counter(ex["caption_0"].split()) == Counter(ex["caption_1"].split())  # the same words
        assert ex["caption_0"] != ex["caption_1"]
        img = [tmp_path / "benchmarks" / "winoground" / "images" / f"{ex[k]}.png" for k in ("image_0", "image_1")]
        assert img[0].read_bytes() != img[1].read_bytes()
        scene0 = parse_caption(ex["caption_0"])
        i = next(n for n, s in enumerate(plan.test) if s == scene0)
        drawn = render(scene0, 32, 8_000_000 + i)  # image 0 is the test image itself
        assert ImageChops.difference(Image.open(img[0]).convert("RGB"), drawn).getbbox() is None


def test_the_readers_take_the_worlds_sets_and_the_cache_gets_their_texts(tmp_path):
    _world(tmp_path)
    (tmp_path / "shards" / "test").mkdir(parents=True)
    configs = world_benchmarks(tmp_path)
    assert [b.name for b in configs] == [
        "shapes_sugarcrepe",
        "shapes_aro_relation",
        "shapes_aro_attribution",
        "shapes_winoground",
    ]
    sets = read_benchmarks(EvalConfig(benchmarks=configs).benchmarks)
    assert len(sets["shapes_sugarcrepe"].captions) == sum(
        len(json.loads(p.read_text())) for p in (tmp_path / "benchmarks" / "sugarcrepe").glob("*.json")
    )
    negatives = set(sets["shapes_sugarcrepe"].negatives) | set(sets["shapes_aro_relation"].negatives)
    texts = set(evaluation_sets._world_benchmark_texts(tmp_path))  # what the cache stage adds to its texts
    assert negatives <= texts and {c for pair in sets["shapes_winoground"].captions for c in pair} <= texts
