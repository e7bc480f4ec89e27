"""The data stage: URL lists → img2dataset → webdataset shards, with per-split stats and a floor.

The synthetic default writes the shapes world as image files plus ``file://`` URL lists and then
takes exactly the path a LAION parquet takes. img2dataset's incremental mode resumes a stopped
download; a change of parameters starts the split afresh (its fingerprint is kept beside it).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from mpe.atomic import atomic_path, write_json, write_text
from mpe.config import DataConfig
from mpe.data.canonical_shards import canonicalize_folder
from mpe.data.evaluation_sets import ASPECTS_FILE, NEGATION_FILE, ZERO_SHOT_FILE
from mpe.data.shapes import aspect_variants, plan_splits, render, zero_shot_prompts
from mpe.data.url_list import read_url_list
from mpe.data.stats import STATS_FILE, shard_manifest, shard_stats
from mpe.errors import DataError
from mpe.hashing import file_sha256, fingerprint

SPLITS = ("train", "val", "test", "negation")
EXTRA_COLUMNS = ["id", "main_colour", "main_shape", "compositional"]


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
    plan = plan_splits(s.train_captions, s.val_captions, s.test_captions, s.negation_queries,
                       s.held_out_pairs, s.p_secondary, seed)
    rows: dict[str, list[dict]] = {k: [] for k in SPLITS}
    jobs = []

    # img2dataset's multiprocessing workers share our working directory; other distributors may not
    relative = cfg.distributor == "multiprocessing"

    def add(split, ident, scene, caption, compositional=False, render_seed=0):
        path = out / "raw" / split / f"{ident}.png"
        jobs.append((scene, path, render_seed))
        rows[split].append({"URL": file_url(path, relative), "TEXT": caption, "id": ident, "main_colour": scene.main.colour,
                            "main_shape": scene.main.shape, "compositional": compositional})

    for i, scene in enumerate(plan.train):
        for j in range(s.images_per_caption):
            add("train", f"train-{i:05d}-{j}", scene, scene.caption(), render_seed=seed * 1_000_003 + i * 31 + j)
    for i, scene in enumerate(plan.val):
        add("val", f"val-{i:05d}", scene, scene.caption(), render_seed=seed + 7_000_000 + i)
    for i, (scene, comp) in enumerate(zip(plan.test, plan.test_compositional)):
        add("test", f"test-{i:05d}", scene, scene.caption(), comp, render_seed=seed + 8_000_000 + i)
    rng = random.Random(seed * 104729 + 5)
    aspects = [{"id": f"test-{i:05d}", "caption": scene.caption(), "variants": aspect_variants(scene, rng)}
               for i, scene in enumerate(plan.test[:s.aspect_probes])]
    negation = []
    for i, (query, without, with_neg) in enumerate(plan.negation):
        rs = seed + 9_000_000 + i  # the same seed: the two images differ only in the negated object
        add("negation", f"neg-{i:05d}-without", without, without.caption(), render_seed=rs)
        add("negation", f"neg-{i:05d}-with", with_neg, with_neg.caption(), render_seed=rs)
        negation.append({"query": query, "positive": f"neg-{i:05d}-without", "negative": f"neg-{i:05d}-with"})
    for scene, path, rs in tqdm(jobs, desc="render shapes", unit="img"):
        _save_png(render(scene, cfg.image_size, rs), path)
    lists = {}
    for split, r in rows.items():
        if r:  # a split with no rows (val_captions: 0) is simply not written
            lists[split] = out / "url_lists" / f"{split}.parquet"
            _write_parquet(pd.DataFrame(r), lists[split])
    write_json(out / NEGATION_FILE, negation)
    write_json(out / ZERO_SHOT_FILE, zero_shot_prompts())
    write_json(out / ASPECTS_FILE, aspects)
    write_json(out / "held_out_pairs.json", sorted(plan.held_out), indent=None)
    return lists


def split_url_list(cfg: DataConfig, seed: int, out: Path) -> tuple[dict[str, Path], dict]:
    """A user URL list split into train and test (``test_fraction`` of the rows)."""
    df, report = read_url_list(cfg.url_list, cfg.url_col, cfg.caption_col, cfg.encoding)
    order = list(range(len(df)))
    random.Random(seed).shuffle(order)
    n_test = max(1, int(round(cfg.test_fraction * len(df))))
    df["id"] = [f"row-{i:09d}" for i in range(len(df))]
    parts = {"test": df.iloc[sorted(order[:n_test])], "train": df.iloc[sorted(order[n_test:])]}
    lists = {}
    for split, part in parts.items():
        lists[split] = out / "url_lists" / f"{split}.parquet"
        _write_parquet(part, lists[split])
    return lists, report


def download_split(url_list: Path, out: Path, cfg: DataConfig, extra_columns: list[str]) -> dict:
    """img2dataset over one URL list into webdataset shards in ``out``; returns the summed stats."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download

    out.mkdir(parents=True, exist_ok=True)
    download(url_list=str(url_list), output_folder=str(out), input_format="parquet", url_col="URL",
             caption_col="TEXT", save_additional_columns=extra_columns or None, output_format="webdataset",
             image_size=cfg.image_size, resize_mode="border", encode_format="jpg", encode_quality=95,
             processes_count=cfg.processes, thread_count=cfg.threads,
             number_sample_per_shard=cfg.samples_per_shard, distributor=cfg.distributor,
             timeout=cfg.timeout, retries=cfg.retries, incremental_mode="incremental",
             enable_wandb=False, compute_hash=None)
    canonicalize_folder(out)
    return shard_stats(out)


def check_success(split: str, stats: dict, floor: float, folder: Path) -> None:
    if stats["count"] == 0:
        raise DataError(f"{folder}: img2dataset wrote no stats for split '{split}'")
    if stats["success_rate"] < floor:
        by_status = ", ".join(f"{k}: {v}" for k, v in sorted(stats["status"].items()))
        raise DataError(f"split '{split}': {stats['successes']}/{stats['count']} images downloaded "
                        f"({stats['success_rate']:.1%} < data.min_success_rate {floor:.0%}); by status: "
                        f"{by_status}. Per-row errors: {folder}/*.parquet (column error_message)")


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


def prepare_data(cfg: DataConfig, seed: int) -> dict:
    """Run the data stage; returns (and writes to ``<out>/stats.json``) the per-split stats.

    ``stats.json`` is removed first and written last: while it is missing, later stages refuse the data,
    so a failed run never leaves a mix of old and new splits in use. Shards whose bytes differ from the
    last run's manifest are downloaded again.
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = json.loads((out / STATS_FILE).read_text()) if (out / STATS_FILE).exists() else {}
    (out / STATS_FILE).unlink(missing_ok=True)
    report = {}
    if cfg.source == "shapes":
        lists = write_shapes_world(cfg, seed, out)
        extra = EXTRA_COLUMNS
    else:
        lists, report = split_url_list(cfg, seed, out)
        extra = ["id"]
        for name, empty in ((NEGATION_FILE, []), (ZERO_SHOT_FILE, {}), (ASPECTS_FILE, [])):
            write_json(out / name, empty)  # a URL list brings no negation, zero-shot or aspect sets of its own
    for stale in (out / "shards").glob("*") if (out / "shards").exists() else []:
        if stale.is_dir() and stale.name not in lists:
            shutil.rmtree(stale)  # a split this configuration does not have
    stats = {"source": cfg.source, "url_list_report": report, "splits": {}, "repaired_shards": {}}
    for split, url_list in lists.items():
        folder = out / "shards" / split
        # where the data lives and how many processes fetch it do not change what is fetched
        what = cfg.model_dump(exclude={"out_dir", "processes", "threads", "distributor", "skip_corrupt_shards"})
        fp = fingerprint({"cfg": what, "seed": seed, "list": file_sha256(url_list)})
        marker = folder / ".fingerprint"
        if folder.exists() and (not marker.exists() or marker.read_text() != fp):
            shutil.rmtree(folder)  # different inputs: never mix shards of two configurations
        elif folder.exists():
            repaired = repair_shards(folder, previous.get("splits", {}).get(split, {}).get("shards", {}))
            if repaired:
                stats["repaired_shards"][split] = repaired
        folder.mkdir(parents=True, exist_ok=True)
        write_text(marker, fp)
        s = download_split(url_list, folder, cfg, extra)
        check_success(split, s, cfg.min_success_rate, folder)
        s["shards"] = shard_manifest(folder)
        stats["splits"][split] = s
    write_json(out / STATS_FILE, stats)
    return stats
