"""The data stage: URL lists → img2dataset → webdataset shards, with per-split stats and a floor.

The synthetic default writes the shapes world as image files plus ``file://`` URL lists and then
takes the path a LAION parquet takes. A user's URL list comes in parts (a file, a folder, a glob): each
part is filtered, split by a hash of the URL, and downloaded on its own into ``<part>-<n>`` shards, so a
new part adds shards and never changes those there. img2dataset's incremental mode resumes a stopped
download; a change of parameters starts that download afresh (its fingerprint is kept beside it).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from itertools import zip_longest
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from mpe.config import DataConfig, RayConfig
from mpe.data.canonical_shards import canonicalize_folder
from mpe.data.compositional_sets import write_compositional_sets
from mpe.data.evaluation_sets import ASPECTS_FILE, BENCHMARKS_DIR, NEGATION_FILE, ZERO_SHOT_FILE
from mpe.data.metadata_filter import filter_rows
from mpe.data.shapes import aspect_variants, plan_splits, render, zero_shot_prompts
from mpe.data.stats import STATS_FILE, by_class, shard_manifest, shard_stats
from mpe.data.url_list import evaluation_rows, list_parts, read_url_list, repeated_urls
from mpe.data.video_sources import write_video_collection, write_video_world
from mpe.errors import DataError
from mpe.files.atomic import atomic_path, write_json, write_text
from mpe.files.hashing import file_sha256, fingerprint

SPLITS = ("train", "val", "test", "negation")
# per image, what a scene is (zero-shot truth, the linear probes' labels): relation "none" with one object
EXTRA_COLUMNS = [
    "id",
    "main_colour",
    "main_shape",
    "main_size",
    "main_position",
    "background",
    "relation",
    "compositional",
]


def file_url(path: Path, relative: bool = True) -> str:
    """A ``file:`` URL for a local image: relative to the working directory where the file lies below
    it (so that URL lists and shards name no machine-specific path), else absolute."""
    path = path.resolve()
    if relative:
        try:
            return "file:" + path.relative_to(Path.cwd().resolve()).as_posix()
        except ValueError:
            pass
    return path.as_uri()


def _write_parquet(df: pd.DataFrame, target: Path) -> None:
    with atomic_path(target, suffix=".parquet") as tmp:
        df.to_parquet(tmp, index=False)


def _save_png(img, target: Path) -> None:
    if target.exists():
        return
    with atomic_path(target, suffix=".png") as tmp:
        img.save(tmp, format="PNG")


def write_shapes_world(cfg: DataConfig, seed: int, out: Path) -> dict[str, Path]:
    """Render the shapes world into ``out/raw`` and write one URL list per split."""
    s = cfg.shapes
    plan = plan_splits(
        s.train_captions,
        s.val_captions,
        s.test_captions,
        s.negation_queries,
        s.held_out_pairs,
        s.p_secondary,
        seed,
        s.minimal_pairs,
    )
    rows: dict[str, list[dict]] = {k: [] for k in SPLITS}
    jobs = []

    # img2dataset's multiprocessing workers share our working directory; other distributors may not
    relative = cfg.distributor == "multiprocessing"

    def add(split, ident, scene, caption, compositional=False, render_seed=0):
        path = out / "raw" / split / f"{ident}.png"
        jobs.append((scene, path, render_seed))
        rows[split].append(
            {
                "URL": file_url(path, relative),
                "TEXT": caption,
                "id": ident,
                "main_colour": scene.main.colour,
                "main_shape": scene.main.shape,
                "main_size": scene.main.size,
                "main_position": scene.position,
                "background": scene.background,
                "relation": scene.relation or "none",
                "compositional": compositional,
            }
        )

    for i, scene in enumerate(plan.train):
        for j in range(s.images_per_caption):
            add("train", f"train-{i:05d}-{j}", scene, scene.caption(), render_seed=seed * 1_000_003 + i * 31 + j)
    for i, scene in enumerate(plan.val):
        add("val", f"val-{i:05d}", scene, scene.caption(), render_seed=seed + 7_000_000 + i)
    for i, (scene, comp) in enumerate(zip(plan.test, plan.test_compositional)):
        add("test", f"test-{i:05d}", scene, scene.caption(), comp, render_seed=seed + 8_000_000 + i)
    rng = random.Random(seed * 104729 + 5)
    # probes from both halves of the test split in turn (held-out pairs and seen ones): a probe set of held-out
    # pairs alone would pit an unseen caption against variants that are mostly seen pairs
    comp = plan.test_compositional
    halves = [[i for i, c in enumerate(comp) if c], [i for i, c in enumerate(comp) if not c]]
    order = [i for pair in zip_longest(*halves) for i in pair if i is not None]
    aspects = [
        {
            "id": f"test-{i:05d}",
            "caption": plan.test[i].caption(),
            "compositional": plan.test_compositional[i],
            "variants": aspect_variants(plan.test[i], rng),
        }
        for i in order[: s.aspect_probes]
    ]
    negation = []
    for i, (query, without, with_neg) in enumerate(plan.negation):
        rs = seed + 9_000_000 + i  # the same seed: the two images differ only in the negated object
        add("negation", f"neg-{i:05d}-without", without, without.caption(), render_seed=rs)
        add("negation", f"neg-{i:05d}-with", with_neg, with_neg.caption(), render_seed=rs)
        negation.append({"query": query, "positive": f"neg-{i:05d}-without", "negative": f"neg-{i:05d}-with"})
    # a rendered file is kept only if rendered from these very inputs (the data folder persists across runs)
    raw_fp = fingerprint({"shapes": s.model_dump(mode="json"), "image_size": cfg.image_size, "seed": seed})
    marker = out / "raw" / ".fingerprint"
    if (out / "raw").exists() and (not marker.exists() or marker.read_text() != raw_fp):
        shutil.rmtree(out / "raw")
    write_text(marker, raw_fp)
    for scene, path, rs in tqdm(jobs, desc="render shapes", unit="img"):
        _save_png(render(scene, cfg.image_size, rs, object_scale=s.object_scale), path)
    lists = {}
    for split, r in rows.items():
        if r:  # a split with no rows (val_captions: 0) is simply not written
            lists[split] = out / "url_lists" / f"{split}.parquet"
            _write_parquet(pd.DataFrame(r), lists[split])
    write_json(out / NEGATION_FILE, negation)
    write_json(out / ZERO_SHOT_FILE, zero_shot_prompts())
    write_json(out / ASPECTS_FILE, aspects)
    write_json(out / "held_out_pairs.json", sorted(plan.held_out), indent=None)
    _reset_benchmarks(out)
    if s.benchmark_items:
        write_compositional_sets(
            out / BENCHMARKS_DIR,
            plan.test,
            [f"test-{i:05d}.png" for i in range(len(plan.test))],
            s.benchmark_items,
            cfg.image_size,
            seed,
            lambda i: seed + 8_000_000 + i,
            s.object_scale,
        )
    _list_benchmarks(out)
    return lists


def split_url_list(cfg: DataConfig, out: Path) -> tuple[dict[str, dict[str, Path]], dict]:
    """Each part of a user URL list filtered by its metadata and split into train and test by a hash of
    the URL (only the parts of ``data.test_parts`` add test rows, when it is set); returns ``{part: {split:
    list file}}`` (a split a part has no row of is left out) and a report per part."""
    lists: dict[str, dict[str, Path]] = {}
    report: dict[str, dict] = {}
    parts = list_parts(cfg.url_list)
    test_parts = None if cfg.test_parts is None else {Path(name).stem for name in cfg.test_parts}
    unknown = sorted((test_parts or set()) - {p.stem for p in parts})
    if unknown:
        raise DataError(
            f"data.test_parts: no part named {', '.join(unknown)} in {cfg.url_list} "
            f"(its parts: {', '.join(p.stem for p in parts)})"
        )
    for path in parts:
        df, rep = read_url_list(path, cfg.url_col, cfg.caption_col, cfg.encoding)
        df, rep["filtered"] = filter_rows(df, cfg.filters, path)
        rep.update(repeated_urls(df["URL"]))
        df["id"] = [f"{path.stem}:{i}" for i in range(len(df))]
        if test_parts is None or path.stem in test_parts:
            test = evaluation_rows(df["URL"], cfg.test_fraction)
        else:  # a pinned evaluation set: this part trains only
            test = pd.Series(False, index=df.index)
        lists[path.stem] = {}
        for split, rows in (("train", df[~test]), ("test", df[test])):
            rep[split] = int(len(rows))
            if len(rows):
                lists[path.stem][split] = out / "url_lists" / split / f"{path.stem}.parquet"
                _write_parquet(rows, lists[path.stem][split])
        report[path.stem] = rep
    for split in ("train", "test"):
        listed = {p[split] for p in lists.values() if split in p}
        for stale in (out / "url_lists" / split).glob("*.parquet"):  # parts no longer listed (data persists)
            if stale not in listed:
                stale.unlink()
        if not any(split in p for p in lists.values()):
            raise DataError(
                f"{cfg.url_list}: no row left for the {split} split (rows after filters: "
                f"{sum(r['train'] + r['test'] for r in report.values())}, with "
                f"{sum(r['distinct_urls'] for r in report.values())} distinct URLs; data.test_fraction "
                f"{cfg.test_fraction}); the rows of one URL stay on one side"
            )
    return lists, report


def download_split(
    url_list: Path, out: Path, cfg: DataConfig, extra_columns: list[str], ray: RayConfig | None = None
) -> dict:
    """img2dataset over one URL list into webdataset shards in ``out``; returns the summed stats.

    With ``data.distributor: ray`` every shard is one Ray task on the cluster of ``ray`` (``ray.address``,
    or a local one on 127.0.0.1), which img2dataset's distributor finds already connected: each task reads
    its rows from ``out/_tmp`` and writes its shard into ``out``, so every node must see ``out`` at the same
    path. A task whose node dies is run again from the start of its shard (Ray's task retries).
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download

    if cfg.distributor == "ray":
        from mpe.runtime.ray_cluster import ensure_ray

        ensure_ray(ray or RayConfig())
    elif cfg.distributor == "pyspark":
        # img2dataset starts a local Spark session (local[processes]) when none is active; its Python workers
        # run PYSPARK_PYTHON, by default the first python3 on PATH, which need not have img2dataset
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

    out.mkdir(parents=True, exist_ok=True)
    download(
        url_list=str(url_list),
        output_folder=str(out),
        input_format="parquet",
        url_col="URL",
        caption_col="TEXT",
        save_additional_columns=extra_columns or None,
        output_format="webdataset",
        image_size=cfg.image_size,
        resize_mode="border",
        encode_format="jpg",
        encode_quality=95,
        processes_count=cfg.processes,
        thread_count=cfg.threads,
        number_sample_per_shard=cfg.samples_per_shard,
        distributor=cfg.distributor,
        timeout=cfg.timeout,
        retries=cfg.retries,
        incremental_mode="incremental",
        max_image_area=cfg.max_image_area,
        disallowed_header_directives=list(cfg.disallowed_header_directives),
        enable_wandb=False,
        compute_hash=None,
    )
    canonicalize_folder(out)
    return shard_stats(out)


def total_stats(splits: dict[str, dict]) -> dict:
    """The counts of every split together: the whole run's outcomes by status and by status class."""
    total = {"count": 0, "successes": 0, "status": {}}
    for s in splits.values():
        total["count"] += s["count"]
        total["successes"] += s["successes"]
        for k, v in s["status"].items():
            total["status"][k] = total["status"].get(k, 0) + v
    total["success_rate"] = total["successes"] / total["count"] if total["count"] else 0.0
    total["status_class"] = by_class(total["status"])
    return total


def check_success(stats: dict, floor: float, out: Path) -> None:
    """Stop the stage when fewer than ``floor`` of all rows were downloaded, with the counts by class."""
    for split, s in stats["splits"].items():
        if s["count"] == 0:
            raise DataError(f"{out / 'shards' / split}: img2dataset wrote no stats for split '{split}'")
    total = stats["outcomes"]
    if total["success_rate"] < floor:
        classes = ", ".join(f"{k}: {v}" for k, v in total["status_class"].items())
        messages = "; ".join(f"{k}: {v}" for k, v in sorted(total["status"].items(), key=lambda kv: -kv[1])[:8])
        raise DataError(
            f"{total['successes']}/{total['count']} images downloaded ({total['success_rate']:.1%} < "
            f"data.min_success_rate {floor:.0%}); by status class: {classes} (messages: {messages}). "
            f"Per-row errors: {out / 'shards'}/<split>/*.parquet (column error_message)"
        )


def repair_shards(folder: Path, manifest: dict[str, dict]) -> list[str]:
    """Delete every shard of ``folder`` whose bytes are not those recorded (with its parquet and stats),
    so img2dataset's incremental mode downloads it again; returns their names."""
    bad = []
    for name, info in manifest.items():
        tar = folder / name
        if tar.exists() and (tar.stat().st_size != info["size"] or file_sha256(tar) != info["sha256"]):
            bad.append(name)
            for sibling in (tar, tar.with_suffix(".parquet"), folder / f"{tar.stem}_stats.json"):
                sibling.unlink(missing_ok=True)
    return bad


# what the shards of a list depend on besides the list itself (where they go, how fast, and what is
# accepted afterwards do not change what is fetched)
NOT_FETCH = {
    "out_dir",
    "processes",
    "threads",
    "distributor",
    "skip_corrupt_shards",
    "min_success_rate",
    "url_list",
    "filters",
    "test_fraction",
    "url_col",
    "caption_col",
    "encoding",
}


def _download_fingerprint(cfg: DataConfig, url_list: Path) -> str:
    return fingerprint({"cfg": cfg.model_dump(exclude=NOT_FETCH), "list": file_sha256(url_list)})


def _part_files(folder: Path, part: str) -> list[Path]:
    """The shard files (tar, parquet, stats) of one part in a split folder: ``<part>-<n>.tar`` etc."""
    prefix = part + "-"
    return [
        f
        for f in folder.iterdir()
        if f.name.startswith(prefix) and f.name[len(prefix) :].split(".")[0].removesuffix("_stats").isdigit()
    ]


def download_part(
    part: str, url_list: Path, folder: Path, staging: Path, cfg: DataConfig, ray: RayConfig | None = None
) -> str:
    """One part of one split: kept when its marker ``<part>.fingerprint`` records these inputs and the
    shards' bytes are those it records, else downloaded by img2dataset into ``staging`` (incremental: a
    killed run resumes there) and moved into ``folder`` as ``<part>-<shard>``. Returns "kept" or
    "downloaded"."""
    fp = _download_fingerprint(cfg, url_list)
    marker = folder / f"{part}.fingerprint"
    mine = {f.name: f for f in _part_files(folder, part)}
    if marker.exists():
        record = json.loads(marker.read_text())
        tars = {n: f for n, f in mine.items() if n.endswith(".tar")}
        if (
            record["fingerprint"] == fp
            and set(tars) == set(record["shards"])
            and all(
                f.stat().st_size == record["shards"][n]["size"] and file_sha256(f) == record["shards"][n]["sha256"]
                for n, f in tars.items()
            )
        ):
            return "kept"
    marker.unlink(missing_ok=True)
    for f in mine.values():
        f.unlink()
    stage_marker = staging / ".fingerprint"
    if staging.exists() and (not stage_marker.exists() or stage_marker.read_text() != fp):
        shutil.rmtree(staging)  # a download of other inputs: never mix
    staging.mkdir(parents=True, exist_ok=True)
    write_text(stage_marker, fp)
    download_split(url_list, staging, cfg, ["id"], ray)
    for f in sorted(staging.iterdir()):
        if f.is_file() and f.suffix in (".tar", ".parquet", ".json"):
            os.replace(f, folder / f"{part}-{f.name}")
    shards = {
        f.name: {"size": f.stat().st_size, "sha256": file_sha256(f)}
        for f in _part_files(folder, part)
        if f.suffix == ".tar"
    }
    write_json(marker, {"fingerprint": fp, "shards": shards})  # written last: a part is whole only with it
    shutil.rmtree(staging)
    return "downloaded"


def _download_url_list(cfg: DataConfig, out: Path, ray: RayConfig | None) -> tuple[list[str], dict, dict]:
    """Every part of a URL list into ``shards/<split>``, parts already there kept; returns the splits,
    the list report and what happened to each part."""
    lists, report = split_url_list(cfg, out)
    parts: dict[str, dict[str, str]] = {}
    for split in ("train", "test"):
        folder = out / "shards" / split
        folder.mkdir(parents=True, exist_ok=True)
        mine = {f"{p}-" for p, s in lists.items() if split in s} | {
            f"{p}.fingerprint" for p, s in lists.items() if split in s
        }
        for f in folder.iterdir():  # shards of parts no longer listed, or of another source
            if not any(f.name.startswith(m) for m in mine):
                shutil.rmtree(f) if f.is_dir() else f.unlink()
        for part, by_split in lists.items():
            if split in by_split:
                what = download_part(part, by_split[split], folder, out / "downloads" / split / part, cfg, ray)
                parts.setdefault(part, {})[split] = what
    shutil.rmtree(out / "downloads", ignore_errors=True)
    _no_evaluation_sets(out)  # a URL list brings no negation, zero-shot or aspect sets of its own
    return ["train", "test"], report, parts


def _reset_benchmarks(out: Path) -> None:
    shutil.rmtree(out / BENCHMARKS_DIR, ignore_errors=True)
    (out / BENCHMARKS_DIR).mkdir()


def _list_benchmarks(out: Path) -> None:
    """The world's compositional sets folder is a dependency of the cache stage, so it always holds a file:
    DVC keeps no empty folder (a checkout, an experiment or a copy would lose it and the stage would fail)."""
    folder = out / BENCHMARKS_DIR
    write_json(folder / "sets.json", sorted(p.name for p in folder.iterdir() if p.is_dir()))


def _no_evaluation_sets(out: Path) -> None:
    for name, empty in ((NEGATION_FILE, []), (ZERO_SHOT_FILE, {}), (ASPECTS_FILE, [])):
        write_json(out / name, empty)
    _reset_benchmarks(out)  # nor compositional sets
    _list_benchmarks(out)


def _download_shapes(
    cfg: DataConfig, seed: int, out: Path, previous: dict, repaired: dict, ray: RayConfig | None
) -> list[str]:
    """The shapes world's splits, each one img2dataset folder resumed in place."""
    lists = write_shapes_world(cfg, seed, out)
    for split, url_list in lists.items():
        folder = out / "shards" / split
        fp = _download_fingerprint(cfg, url_list)
        marker = folder / ".fingerprint"
        if folder.exists() and (not marker.exists() or marker.read_text() != fp):
            shutil.rmtree(folder)  # different inputs: never mix shards of two configurations
        elif folder.exists():
            bad = repair_shards(folder, previous.get("splits", {}).get(split, {}).get("shards", {}))
            if bad:
                repaired[split] = bad
        folder.mkdir(parents=True, exist_ok=True)
        write_text(marker, fp)
        download_split(url_list, folder, cfg, EXTRA_COLUMNS, ray)
    return list(lists)


def prepare_data(cfg: DataConfig, seed: int, ray: RayConfig | None = None) -> dict:
    """Run the data stage; returns (and writes to ``<out>/stats.json``) the per-split stats. ``ray``: the
    cluster img2dataset's Ray distributor runs on (``data.distributor: ray``).

    ``stats.json`` is removed first and written last: while it is missing, later stages refuse the data,
    so a failed run never leaves a mix of old and new splits in use. Shards whose bytes differ from the
    last run's manifest are downloaded again.
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = json.loads((out / STATS_FILE).read_text()) if (out / STATS_FILE).exists() else {}
    (out / STATS_FILE).unlink(missing_ok=True)
    stats = {"source": cfg.source, "url_list_report": {}, "parts": {}, "splits": {}, "repaired_shards": {}}
    if cfg.source == "shapes":
        splits = _download_shapes(cfg, seed, out, previous, stats["repaired_shards"], ray)
        if cfg.video.zero_shot_test:  # the moving-shapes test clips, for the image model's zero-shot video retrieval
            splits += write_video_world(cfg, seed, out, {"video_test": "test"})
    elif cfg.is_video:
        if cfg.source == "video_shapes":
            splits = write_video_world(cfg, seed, out, {"train": "train", "test": "test"})
        else:
            splits = write_video_collection(cfg, out)
        _no_evaluation_sets(out)
    else:
        splits, stats["url_list_report"], stats["parts"] = _download_url_list(cfg, out, ray)
    stats["modality"] = "video" if cfg.is_video else "image"
    for stale in (out / "shards").glob("*"):
        if stale.is_dir() and stale.name not in splits:
            shutil.rmtree(stale)  # a split this configuration does not have
    for split in splits:
        stats["splits"][split] = shard_stats(out / "shards" / split)
        stats["splits"][split]["shards"] = shard_manifest(out / "shards" / split)
    stats["outcomes"] = total_stats(stats["splits"])
    check_success(stats, cfg.min_success_rate, out)
    write_json(out / STATS_FILE, stats)
    return stats
