"""The standard benchmarks on small copies of each format written to disk: every metric against a
brute-force computation (one forward pass per text and per image, python loops over ranks) and against
CLIP_benchmark's own metric functions; the CLIP_benchmark wds copy is written and read back with the
webdataset library as CLIP_benchmark does (its dataset module itself needs torchvision, which the project
does not install); the error messages for missing folders and bad rows; the gate naming a benchmark metric."""

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from mpe.config import EvalConfig
from mpe.errors import ConfigError, DataError
from mpe.evaluation.benchmarks.scoring import benchmark_metrics, read_benchmarks
from mpe.evaluation.tasks import TextEmbedder
from mpe.tracking.gate import gate_score
from tests.unit.test_model import tiny_model

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white"]
SHAPES = ["circle", "square", "triangle"]
RGB = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
    "purple": (150, 40, 180),
    "orange": (240, 140, 20),
    "white": (245, 245, 245),
}


def picture(i: int) -> Image.Image:
    """A distinct small picture: coloured shape on a shaded background, of varying size."""
    colour, shape = COLOURS[i % len(COLOURS)], SHAPES[i % len(SHAPES)]
    im = Image.new("RGB", (48 + 4 * (i % 3), 40), (20 * i % 255, 90, 160 - 10 * i % 160))
    d = ImageDraw.Draw(im)
    box = (8 + i, 6, 36 + i, 34)
    if shape == "circle":
        d.ellipse(box, fill=RGB[colour])
    elif shape == "square":
        d.rectangle(box, fill=RGB[colour])
    else:
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=RGB[colour])
    return im


def captions_of(i: int) -> list[str]:
    c, s = COLOURS[i % len(COLOURS)], SHAPES[i % len(SHAPES)]
    return [f"a {c} {s}", f"one {s} in {c}", f"a picture of a {c} {s}", f"the {s} is {c}", f"{c} {s} on a plain ground"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small copies of every format: Flickr30k and COCO Karpathy JSONs, a CLIP_benchmark wds, an
    ImageFolder of 4 classes and a NegBench MCQ CSV."""
    import io

    import webdataset

    root = tmp_path_factory.mktemp("benchmarks")
    (root / "flickr" / "flickr30k-images").mkdir(parents=True)
    entries = []
    for i in range(6):  # 4 test images, one train, one val
        picture(i).save(root / "flickr" / "flickr30k-images" / f"{1000 + i}.jpg", quality=95)
        split = "train" if i == 4 else "val" if i == 5 else "test"
        entries.append(
            {
                "filename": f"{1000 + i}.jpg",
                "imgid": i,
                "split": split,
                "sentences": [{"raw": c + " ", "tokens": c.split()} for c in captions_of(i)],
            }
        )
    (root / "flickr" / "dataset_flickr30k.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))

    (root / "coco" / "val2014").mkdir(parents=True)
    coco = []
    for i in range(3):
        picture(i + 2).save(root / "coco" / "val2014" / f"COCO_val2014_{i:012d}.png")
        coco.append(
            {
                "filepath": "val2014",
                "filename": f"COCO_val2014_{i:012d}.png",
                "split": "test",
                "sentences": [{"raw": c} for c in captions_of(i + 2)],
            }
        )
    (root / "coco" / "dataset_coco.json").write_text(json.dumps({"images": coco}))

    # as clip_benchmark.webdataset_builder.convert_retrieval_dataset writes it: lossless webp, captions
    # joined by newlines, 2 samples per shard (2 shards), nshards.txt and dataset_type.txt
    (root / "wds" / "test").mkdir(parents=True)
    (root / "wds" / "dataset_type.txt").write_text("retrieval\n")
    with webdataset.ShardWriter(str(root / "wds" / "test" / "%d.tar"), maxcount=2, verbose=0) as sink:
        for i in range(4):
            buf = io.BytesIO()
            picture(i + 1).save(buf, format="webp", lossless=True)
            sink.write({"__key__": f"s{i:07d}", "webp": buf.getvalue(), "txt": "\n".join(captions_of(i + 1))})
        shards = sink.shard
    (root / "wds" / "test" / "nshards.txt").write_text(f"{shards}\n")

    names = {"cls_a": "red circle", "cls_b": "green square", "cls_c": "blue triangle", "cls_d": "yellow circle"}
    for n, folder in enumerate(names):
        (root / "folder" / folder).mkdir(parents=True)
        for j in range(2):
            picture(n + 4 * j).save(root / "folder" / folder / f"img{j}.{'JPG' if j == 1 else 'png'}")
    (root / "classnames.json").write_text(json.dumps(names))

    (root / "neg" / "images").mkdir(parents=True)
    with (root / "neg" / "mcq.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "image_path",
                "caption_0",
                "caption_1",
                "caption_2",
                "caption_3",
                "correct_answer",
                "correct_answer_template",
            ]
        )
        for i in range(5):
            picture(i).save(root / "neg" / "images" / f"{i}.jpg", quality=95)  # the pixels of flickr's
            c, s = COLOURS[i % 7], SHAPES[i % 3]
            options = [f"a {c} {s}", f"a {s} but no {c}", f"not a {c} {s}", f"a {COLOURS[(i + 1) % 7]} {s}"]
            w.writerow([f"images/{i}.jpg", *options, i % 4, ["positive", "negative", "hybrid"][i % 3]])
    return root


def bench(files, *more):
    base = [
        {
            "name": "flickr30k",
            "kind": "karpathy",
            "path": str(files / "flickr" / "dataset_flickr30k.json"),
            "image_root": str(files / "flickr" / "flickr30k-images"),
        },
        {"name": "coco", "kind": "karpathy", "path": str(files / "coco" / "dataset_coco.json")},
        {"name": "wds", "kind": "clip_benchmark_wds", "path": str(files / "wds")},
        {
            "name": "shapes4",
            "kind": "image_folder",
            "path": str(files / "folder"),
            "classnames": str(files / "classnames.json"),
            "templates": ["a photo of a {c}.", "{c}", "a drawing of a {c}"],
            "top_k": [1, 2, 5],
        },
        {"name": "negbench", "kind": "negbench_mcq", "path": str(files / "neg" / "mcq.csv")},
    ]
    return EvalConfig(benchmarks=[*base, *more]).benchmarks


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer)


@pytest.fixture(scope="module")
def evaluated(files, model):
    sets = read_benchmarks(bench(files))
    return sets, benchmark_metrics(model, sets, TextEmbedder(model, None, batch_size=8), (1, 2, 5), batch_size=3)


_TEXTS, _IMAGES = {}, {}  # the reference passes, memoised: the formats share captions and pixels


def one_text(model, text):
    """The reference: one forward pass for this text alone, normalised here."""
    if text not in _TEXTS:
        with torch.no_grad():
            _TEXTS[text] = F.normalize(model.encode_text([text])[0], dim=-1)
    return _TEXTS[text]


def one_image(model, image):
    key = (image.size, image.tobytes())
    if key not in _IMAGES:
        with torch.no_grad():
            _IMAGES[key] = F.normalize(model.encode_image([image])[0], dim=-1)
    return _IMAGES[key]


def brute_retrieval(model, images, captions, owner, ks):
    """R@k both ways from per-item embeddings and rank counting in python."""
    v = [one_image(model, im) for im in images]
    t = [one_text(model, c) for c in captions]
    s = [[float(t[j] @ v[i]) for i in range(len(v))] for j in range(len(t))]
    out = {}
    for k in ks:
        t2i = [sum(s[j][i] > s[j][owner[j]] for i in range(len(v))) < k for j in range(len(t))]
        i2t = []
        for i in range(len(v)):
            mine = [j for j in range(len(t)) if owner[j] == i]
            best = max(s[j][i] for j in mine)
            i2t.append(sum(s[j][i] > best for j in range(len(t))) < k)
        out[f"text_to_image_R@{k}"] = sum(t2i) / len(t2i)
        out[f"image_to_text_R@{k}"] = sum(i2t) / len(i2t)
    return out, torch.tensor(s)


def test_karpathy_flickr_and_coco_match_brute_force_and_clip_benchmark(files, model, evaluated):
    from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k

    _, (flat, details) = evaluated
    assert details["flickr30k"]["n_images"] == 4 and details["flickr30k"]["n_texts"] == 20  # test split only
    assert details["coco"]["n_images"] == 3 and details["coco"]["n_texts"] == 15
    for name, folder, ids in (
        ("flickr30k", files / "flickr" / "flickr30k-images", range(4)),
        ("coco", files / "coco" / "val2014", range(3)),
    ):
        paths = sorted(folder.iterdir())
        images = [Image.open(p).convert("RGB") for p in paths]
        captions = [c for i in ids for c in captions_of(i + (2 if name == "coco" else 0))]
        owner = [i for i in range(len(ids)) for _ in range(5)]
        ref, scores = brute_retrieval(model, images[: len(ids)], captions, owner, (1, 2, 5))
        pos = torch.zeros_like(scores, dtype=torch.bool)
        pos[torch.arange(len(owner)), torch.tensor(owner)] = True
        for key, value in ref.items():
            assert flat[f"{name}.{key}"] == pytest.approx(value, abs=1e-6), key
        for k in (1, 2, 5):
            if k <= len(ids):  # clip_benchmark's topk needs k <= the number of images
                ref_t2i = (recall_at_k(scores, pos, k) > 0).float().mean().item()
                assert flat[f"{name}.text_to_image_R@{k}"] == pytest.approx(ref_t2i)
            ref_i2t = (recall_at_k(scores.T, pos.T, k) > 0).float().mean().item()
            assert flat[f"{name}.image_to_text_R@{k}"] == pytest.approx(ref_i2t)
    assert flat["flickr30k.text_to_image_R@5"] == 1.0  # 4 images: every caption's image is in the top 5
    assert 0 < flat["flickr30k.text_to_image_R@1"] < 1  # the random model ranks neither perfectly nor never


def test_clip_benchmark_wds_reads_as_clip_benchmark_reads_it(files, model, evaluated):
    import webdataset as wds

    sets, (flat, details) = evaluated
    n = int((files / "wds" / "test" / "nshards.txt").read_text())
    pattern = str(files / "wds" / "test" / f"{{0..{n - 1}}}.tar")  # clip_benchmark's build_wds_dataset pipeline
    theirs = list(
        wds.WebDataset(pattern, shardshuffle=False, nodesplitter=lambda src: src)
        .decode(wds.autodecode.ImageHandler("pil", extensions=["webp", "png", "jpg", "jpeg"]))
        .to_tuple(["webp", "png", "jpg", "jpeg"], "txt")
        .map_tuple(lambda im: im, str.splitlines)
    )
    assert len(list((files / "wds" / "test").glob("*.tar"))) == 2
    mine = sets["wds"]
    assert [c for _, caps in theirs for c in caps] == mine.captions
    assert mine.caption_image == [i for i, (_, caps) in enumerate(theirs) for _ in caps]
    owner = mine.caption_image
    ref, _ = brute_retrieval(model, [im.convert("RGB") for im, _ in theirs], mine.captions, owner, (1, 2, 5))
    for key, value in ref.items():
        assert flat[f"wds.{key}"] == pytest.approx(value, abs=1e-6), key
    assert details["wds"]["n_images"] == 4 and details["wds"]["n_texts"] == 20


def test_image_folder_zero_shot_matches_template_ensemble_by_hand(files, model, evaluated):
    _, (flat, details) = evaluated
    names = json.loads((files / "classnames.json").read_text())
    folders = sorted(names)
    templates = ["a photo of a {c}.", "{c}", "a drawing of a {c}"]
    weights = []
    for f in folders:
        e = sum(one_text(model, t.format(c=names[f])) for t in templates) / len(templates)
        weights.append(e / e.norm())
    logits, truth = [], []
    for label, f in enumerate(folders):
        for p in sorted((files / "folder" / f).iterdir()):
            v = one_image(model, Image.open(p).convert("RGB"))
            logits.append([float(v @ w) for w in weights])
            truth.append(label)
    for k in (1, 2):
        hits = [sum(x > row[y] for x in row) < k for row, y in zip(logits, truth)]
        assert flat[f"shapes4.top{k}_accuracy"] == pytest.approx(sum(hits) / len(hits), abs=1e-6)
    # (clip_benchmark's own accuracy() fails under numpy 2 — float() of a 1-element array — so no second check)
    assert "shapes4.top5_accuracy" not in flat  # 4 classes: top-5 says nothing (CLIP_benchmark reports nan)
    assert details["shapes4"] == {
        **{k.split(".")[1]: v for k, v in flat.items() if k.startswith("shapes4.")},
        "n_images": 8,
        "n_classes": 4,
    }


def test_negbench_mcq_accuracy_and_per_type_by_hand(files, model, evaluated):
    _, (flat, details) = evaluated
    right, by_type = [], {}
    with (files / "neg" / "mcq.csv").open() as f:
        for row in csv.DictReader(f):
            v = one_image(model, Image.open(files / "neg" / row["image_path"]).convert("RGB"))
            scores = [float(v @ one_text(model, row[f"caption_{j}"])) for j in range(4)]
            ok = max(range(4), key=scores.__getitem__) == int(row["correct_answer"])
            right.append(ok)
            by_type.setdefault(row["correct_answer_template"], []).append(ok)
    assert flat["negbench.accuracy"] == pytest.approx(sum(right) / len(right), abs=1e-6)
    for t, oks in by_type.items():
        assert flat[f"negbench.accuracy_{t}"] == pytest.approx(sum(oks) / len(oks), abs=1e-6)
    assert details["negbench"]["n_questions"] == 5 and details["negbench"]["n_options"] == 4


def test_missing_files_fail_with_the_path_and_the_layout(files, tmp_path):
    cases = [
        (
            {"name": "f", "kind": "karpathy", "path": str(tmp_path / "dataset_flickr30k.json")},
            "dataset_flickr30k.json: benchmark file not found; expected Karpathy's JSON",
        ),
        (
            {
                "name": "f",
                "kind": "karpathy",
                "path": str(files / "flickr" / "dataset_flickr30k.json"),
                "image_root": str(tmp_path / "nope"),
            },
            "nope: benchmark folder not found",
        ),
        (
            {"name": "w", "kind": "clip_benchmark_wds", "path": str(tmp_path)},
            "test/nshards.txt: benchmark file not found; expected CLIP_benchmark's webdataset",
        ),
        (
            {"name": "i", "kind": "image_folder", "path": str(tmp_path / "imagenet")},
            "imagenet: benchmark folder not found; expected one folder per class",
        ),
        (
            {"name": "n", "kind": "negbench_mcq", "path": str(tmp_path / "mcq.csv")},
            "mcq.csv: benchmark file not found; expected NegBench's MCQ CSV",
        ),
    ]
    for entry, message in cases:
        with pytest.raises(DataError, match=message.replace("(", r"\(")):
            read_benchmarks(EvalConfig(benchmarks=[entry]).benchmarks)


def test_bad_rows_are_named(files, tmp_path):
    flickr = json.loads((files / "flickr" / "dataset_flickr30k.json").read_text())
    del flickr["images"][3]["sentences"][2]["raw"]
    (tmp_path / "k.json").write_text(json.dumps(flickr))
    k = {
        "name": "k",
        "kind": "karpathy",
        "path": str(tmp_path / "k.json"),
        "image_root": str(files / "flickr" / "flickr30k-images"),
    }
    with pytest.raises(DataError, match=r"k.json: images\[3\].sentences\[2\]: missing key 'raw'"):
        read_benchmarks(EvalConfig(benchmarks=[k]).benchmarks)

    flickr = json.loads((files / "flickr" / "dataset_flickr30k.json").read_text())
    (tmp_path / "img").mkdir()
    for p in (files / "flickr" / "flickr30k-images").iterdir():
        (tmp_path / "img" / p.name).write_bytes(p.read_bytes())
    (tmp_path / "img" / "1002.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "k2.json").write_text(json.dumps(flickr))
    k2 = {**k, "path": str(tmp_path / "k2.json"), "image_root": str(tmp_path / "img")}
    with pytest.raises(DataError, match=r"k2.json: images\[2\] \(.*1002.jpg\): image does not open"):
        read_benchmarks(EvalConfig(benchmarks=[k2]).benchmarks)

    rows = (files / "neg" / "mcq.csv").read_text().splitlines()
    (tmp_path / "images").symlink_to(files / "neg" / "images")
    (tmp_path / "nocol.csv").write_text("\n".join(r.replace("correct_answer,", "answer,", 1) for r in rows))
    with pytest.raises(DataError, match=r"nocol.csv: missing column\(s\) \['correct_answer'\]"):
        read_benchmarks(
            EvalConfig(
                benchmarks=[{"name": "n", "kind": "negbench_mcq", "path": str(tmp_path / "nocol.csv")}]
            ).benchmarks
        )
    bad = rows[:3] + [rows[3].replace("images/2.jpg", "images/missing.jpg")] + rows[4:]
    (tmp_path / "badrow.csv").write_text("\n".join(bad))
    with pytest.raises(DataError, match=r"badrow.csv: row 3 \(line 4\) \(.*missing.jpg\): image file not found"):
        read_benchmarks(
            EvalConfig(
                benchmarks=[{"name": "n", "kind": "negbench_mcq", "path": str(tmp_path / "badrow.csv")}]
            ).benchmarks
        )
    bad = rows[:2] + [rows[2].rsplit(",", 2)[0] + ",7,negative"] + rows[3:]
    (tmp_path / "badanswer.csv").write_text("\n".join(bad))
    with pytest.raises(DataError, match=r"badanswer.csv: row 2 \(line 3\): correct_answer 7 is not among"):
        read_benchmarks(
            EvalConfig(
                benchmarks=[{"name": "n", "kind": "negbench_mcq", "path": str(tmp_path / "badanswer.csv")}]
            ).benchmarks
        )


def test_config_rejects_bad_entries():
    with pytest.raises(ValueError, match="unique"):
        EvalConfig(benchmarks=[{"name": "a", "kind": "karpathy", "path": "x"}] * 2)
    with pytest.raises(ValueError, match="name"):
        EvalConfig(benchmarks=[{"name": "flickr.30k", "kind": "karpathy", "path": "x"}])
    with pytest.raises(ValueError, match="'{c}'"):
        EvalConfig(benchmarks=[{"name": "i", "kind": "image_folder", "path": "x", "templates": ["a photo"]}])
    with pytest.raises(ValueError, match="kind"):
        EvalConfig(benchmarks=[{"name": "i", "kind": "imagenet", "path": "x"}])
    assert EvalConfig().benchmarks == []


def test_gate_names_a_benchmark_metric_and_mean_recall_ignores_benchmarks(evaluated):
    _, (flat, _) = evaluated
    test = {"text_to_image_R@1": 0.2, "image_to_text_R@1": 0.4, "compositional_text_to_image_R@1": 0.9}
    metrics = {**test, **flat}
    assert gate_score(metrics, "flickr30k.text_to_image_R@2") == flat["flickr30k.text_to_image_R@2"]
    assert gate_score(metrics, "mean_recall") == pytest.approx(0.3)
    with pytest.raises(
        ConfigError,
        match=r"'flickr30k.text_to_image_R@10' is not among the evaluated metrics; "
        r"available: mean_recall, .*flickr30k.text_to_image_R@5",
    ):
        gate_score(metrics, "flickr30k.text_to_image_R@10")


# -- compositional sets in their own formats: SugarCrepe, ARO's VG-Relation / VG-Attribution, Winoground ----
@pytest.fixture(scope="module")
def compositional_files(tmp_path_factory):
    """Small copies of each format as the released sets ship: SugarCrepe's per-category JSON over a COCO-like
    image folder (images shared between categories), ARO's two JSON lists with boxes over images/, Winoground's
    examples.jsonl with images/<name>.png."""
    root = tmp_path_factory.mktemp("compositional")
    (root / "coco" / "val2017").mkdir(parents=True)
    for i in range(5):
        picture(i).save(root / "coco" / "val2017" / f"{i:012d}.jpg", quality=95)
    (root / "sugarcrepe").mkdir()
    for cat, rows in {
        "swap_att": [
            (0, "a red circle and a blue square", "a blue circle and a red square"),
            (1, "x green", "y green"),
        ],
        "replace_obj": [(i, captions_of(i)[0], captions_of(i + 1)[0]) for i in range(5)],
        "add_att": [(2, "a blue triangle", "a small blue triangle"), (0, "a red circle", "a red circle and a cat")],
    }.items():
        items = {
            str(k): {"filename": f"{i:012d}.jpg", "caption": c, "negative_caption": n}
            for k, (i, c, n) in enumerate(rows)
        }
        (root / "sugarcrepe" / f"{cat}.json").write_text(json.dumps(items))
    (root / "aro" / "images").mkdir(parents=True)
    for i in range(4):
        picture(i + 1).save(root / "aro" / "images" / f"{2300 + i}.jpg", quality=95)
    relation = [
        {
            "image_path": f"{2300 + i % 4}.jpg",
            "bbox_x": i,
            "bbox_y": 2,
            "bbox_w": 30 - i,
            "bbox_h": 25,
            "relation_name": ["on", "under", "holding"][i % 3],
            "true_caption": f"the {c} is on the {s}",
            "false_caption": f"the {s} is on the {c}",
        }
        for i, (c, s) in enumerate(zip(COLOURS, ["table", "mat", "cup", "box", "rug", "bed", "shelf"]))
    ]
    (root / "aro" / "visual_genome_relation.json").write_text(json.dumps(relation))
    attribution = [
        {
            "image_path": f"{2300 + i % 4}.jpg",
            "bbox_x": 0,
            "bbox_y": 0,
            "bbox_w": 40,
            "bbox_h": 30 + i,
            "attributes": [a, b],
            "true_caption": f"the {a} shirt and the {b} door",
            "false_caption": f"the {b} shirt and the {a} door",
        }
        for i, (a, b) in enumerate([("red", "white")] * 3 + [("green", "open")] * 2 + [("blue", "wooden")])
    ]
    (root / "aro" / "visual_genome_attribution.json").write_text(json.dumps(attribution))
    (root / "wino" / "images").mkdir(parents=True)
    lines = []
    for i in range(4):
        picture(2 * i).save(root / "wino" / "images" / f"ex_{i}_img_0.png")
        picture(2 * i + 1).save(root / "wino" / "images" / f"ex_{i}_img_1.png")
        c0, c1 = captions_of(2 * i)[0], captions_of(2 * i + 1)[0]
        lines.append(
            json.dumps(
                {
                    "id": i,
                    "caption_0": c0,
                    "caption_1": c1,
                    "tag": "Object",
                    "image_0": f"ex_{i}_img_0",
                    "image_1": f"ex_{i}_img_1",
                    "secondary_tag": "",
                    "num_main_preds": 1,
                    "collapsed_tag": "Object",
                }
            )
        )
    (root / "wino" / "examples.jsonl").write_text("\n".join(lines) + "\n")
    return root


def compositional_bench(root):
    return EvalConfig(
        benchmarks=[
            {
                "name": "sc",
                "kind": "sugarcrepe",
                "path": str(root / "sugarcrepe"),
                "image_root": str(root / "coco" / "val2017"),
            },
            {
                "name": "vgr",
                "kind": "aro_vg_relation",
                "path": str(root / "aro" / "visual_genome_relation.json"),
                "exclude_groups": ["holding"],
            },
            {
                "name": "vga",
                "kind": "aro_vg_attribution",
                "path": str(root / "aro" / "visual_genome_attribution.json"),
                "min_group_count": 2,
            },
            {"name": "wino", "kind": "winoground", "path": str(root / "wino" / "examples.jsonl")},
        ]
    ).benchmarks


@pytest.fixture(scope="module")
def compositional_evaluated(compositional_files, model):
    sets = read_benchmarks(compositional_bench(compositional_files))
    return benchmark_metrics(model, sets, TextEmbedder(model, None, batch_size=4), (1,), batch_size=3)


def prefers(model, image, caption, negative) -> bool:
    v = one_image(model, image)
    return float(v @ one_text(model, caption)) > float(v @ one_text(model, negative))


def test_sugarcrepe_accuracy_per_category_matches_brute_force(compositional_files, model, compositional_evaluated):
    flat, details = compositional_evaluated
    per_cat = {}
    for file in sorted((compositional_files / "sugarcrepe").glob("*.json")):
        items = json.loads(file.read_text())
        right = [
            prefers(
                model,
                Image.open(compositional_files / "coco" / "val2017" / it["filename"]).convert("RGB"),
                it["caption"],
                it["negative_caption"],
            )
            for it in items.values()
        ]
        per_cat[file.stem] = sum(right) / len(right)
        assert flat[f"sc.{file.stem}"] == pytest.approx(per_cat[file.stem], abs=1e-6), file.stem
    assert flat["sc.macro_accuracy"] == pytest.approx(sum(per_cat.values()) / 3, abs=1e-6)
    assert details["sc"]["n_pairs"] == 9
    # each prompt's segment alone, for the multi-prompt model (3 prompts)
    k = model.num_pieces
    for file in sorted((compositional_files / "sugarcrepe").glob("*.json")):
        for p in range(k):
            right = []
            for it in json.loads(file.read_text()).values():
                im = Image.open(compositional_files / "coco" / "val2017" / it["filename"]).convert("RGB")
                seg = lambda e, p=p: F.normalize(e.view(k, -1)[p], dim=0)  # noqa: E731
                v = seg(one_image(model, im))
                right.append(
                    float(v @ seg(one_text(model, it["caption"])))
                    > float(v @ seg(one_text(model, it["negative_caption"])))
                )
            assert details["sc"]["analysis"][f"{file.stem}_prompt_{p + 1}"] == pytest.approx(sum(right) / len(right))


def test_aro_accuracy_and_macro_accuracy_match_brute_force_with_boxes(
    compositional_files, model, compositional_evaluated
):
    flat, details = compositional_evaluated
    for name, file, group, keep in (
        ("vgr", "visual_genome_relation.json", lambda it: it["relation_name"], lambda g, n: g != "holding"),
        ("vga", "visual_genome_attribution.json", lambda it: "_".join(it["attributes"]), lambda g, n: n >= 2),
    ):
        items = json.loads((compositional_files / "aro" / file).read_text())
        by_group = {}
        for it in items:
            im = Image.open(compositional_files / "aro" / "images" / it["image_path"]).convert("RGB")
            box = (it["bbox_x"], it["bbox_y"], it["bbox_x"] + it["bbox_w"], it["bbox_y"] + it["bbox_h"])
            by_group.setdefault(group(it), []).append(
                prefers(model, im.crop(box), it["true_caption"], it["false_caption"])
            )
        everything = [r for rs in by_group.values() for r in rs]
        kept = [sum(rs) / len(rs) for g, rs in by_group.items() if keep(g, len(rs))]
        assert flat[f"{name}.accuracy"] == pytest.approx(sum(everything) / len(everything), abs=1e-6)
        assert flat[f"{name}.macro_accuracy"] == pytest.approx(sum(kept) / len(kept), abs=1e-6)
        assert details[name]["n_groups"] == len(kept)
    assert details["vgr"]["n_groups"] == 2 and details["vga"]["n_groups"] == 2  # 'holding' and 'blue_wooden' left out


def test_winoground_text_image_and_group_scores_match_brute_force(compositional_files, model, compositional_evaluated):
    flat, details = compositional_evaluated
    text = image = group = 0
    lines = (compositional_files / "wino" / "examples.jsonl").read_text().splitlines()
    for line in lines:
        ex = json.loads(line)
        ims = [
            one_image(
                model, Image.open(compositional_files / "wino" / "images" / f"{ex[f'image_{i}']}.png").convert("RGB")
            )
            for i in (0, 1)
        ]
        caps = [one_text(model, ex[f"caption_{c}"]) for c in (0, 1)]
        s = {(c, i): float(caps[c] @ ims[i]) for c in (0, 1) for i in (0, 1)}
        t = s[0, 0] > s[1, 0] and s[1, 1] > s[0, 1]
        im = s[0, 0] > s[0, 1] and s[1, 1] > s[1, 0]
        text, image, group = text + t, image + im, group + (t and im)
    n = len(lines)
    assert flat["wino.text_score"] == pytest.approx(text / n)
    assert flat["wino.image_score"] == pytest.approx(image / n)
    assert flat["wino.group_score"] == pytest.approx(group / n)
    assert details["wino"]["n_groups"] == 4


def test_compositional_formats_name_the_file_and_row_of_bad_input(compositional_files, tmp_path):
    sc = {
        "name": "sc",
        "kind": "sugarcrepe",
        "path": str(tmp_path / "sc"),
        "image_root": str(compositional_files / "coco" / "val2017"),
    }
    (tmp_path / "sc").mkdir()
    with pytest.raises(DataError, match=r"sc: no \*.json category file"):
        read_benchmarks(EvalConfig(benchmarks=[sc]).benchmarks)
    (tmp_path / "sc" / "swap_att.json").write_text(json.dumps({"7": {"filename": "000000000000.jpg", "caption": "a"}}))
    with pytest.raises(DataError, match=r"swap_att.json: item '7': missing or empty \['negative_caption'\]"):
        read_benchmarks(EvalConfig(benchmarks=[sc]).benchmarks)
    (tmp_path / "sc" / "swap_att.json").write_text(
        json.dumps({"0": {"filename": "nope.jpg", "caption": "a", "negative_caption": "b"}})
    )
    with pytest.raises(DataError, match=r"swap_att.json: item '0' \(.*nope.jpg\): image file not found"):
        read_benchmarks(EvalConfig(benchmarks=[sc]).benchmarks)
    items = json.loads((compositional_files / "aro" / "visual_genome_relation.json").read_text())
    del items[2]["relation_name"]
    (tmp_path / "images").symlink_to(compositional_files / "aro" / "images")
    (tmp_path / "vgr.json").write_text(json.dumps(items))
    with pytest.raises(DataError, match=r"vgr.json: item 2: missing key 'relation_name'"):
        read_benchmarks(
            EvalConfig(
                benchmarks=[{"name": "v", "kind": "aro_vg_relation", "path": str(tmp_path / "vgr.json")}]
            ).benchmarks
        )
    lines = (compositional_files / "wino" / "examples.jsonl").read_text().splitlines()
    (tmp_path / "w.jsonl").write_text("\n".join([lines[0], lines[1].replace("ex_1_img_1", "ex_9_img_1")]))
    (tmp_path / "w-images").symlink_to(compositional_files / "wino" / "images")
    w = {"name": "w", "kind": "winoground", "path": str(tmp_path / "w.jsonl"), "image_root": str(tmp_path / "w-images")}
    with pytest.raises(DataError, match=r"w.jsonl: line 2 \(.*ex_9_img_1.png\): image file not found"):
        read_benchmarks(EvalConfig(benchmarks=[w]).benchmarks)
