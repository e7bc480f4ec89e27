"""Video webdataset shards in video2dataset's output format, so that shards video2dataset writes elsewhere and
those mpe writes are read by one path: per shard ``NNNNN.tar`` with ``<key>.mp4``, ``<key>.txt`` (the
caption) and ``<key>.json`` (the sample's metadata) per sample, ``NNNNN.parquet`` (one row per sample tried:
``key``, ``caption``, ``status``, ``error_message`` and the metadata) and ``NNNNN_stats.json`` (``count``,
``successes``, ``failed_to_download``, ``status_dict``), the counts ``mpe.data.stats`` sums. Tars are
written in canonical form (members in key order, zeroed times and owners), like img2dataset's after
``canonicalize_folder``: the same inputs give the same bytes.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mpe.files.atomic import atomic_path, write_json


@dataclass
class VideoRecord:
    """One sample to write: its video bytes (None when it could not be had: ``status`` says why)."""

    video: bytes | None
    caption: str
    meta: dict = field(default_factory=dict)
    status: str = "success"
    ext: str = "mp4"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def write_shard(records: list[VideoRecord], folder: Path, shard: int) -> dict:
    """One shard of ``records`` (keys ``NNNNNMMMM``, video2dataset's and img2dataset's); returns its stats."""
    import pandas as pd

    name = f"{shard:05d}"
    rows, status = [], Counter()
    with atomic_path(folder / f"{name}.tar", suffix=".tar") as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, rec in enumerate(records):
                key = f"{name}{i:04d}"
                ok = rec.status == "success" and rec.video is not None
                meta = {**rec.meta, "key": key, "caption": rec.caption, "status": "success" if ok else "failed"}
                meta["error_message"] = None if ok else rec.status
                status[rec.status if not ok else "success"] += 1
                rows.append(meta)
                if ok:
                    members = {
                        rec.ext: rec.video,
                        "json": json.dumps(meta, indent=4, sort_keys=True).encode(),
                        "txt": rec.caption.encode(),
                    }
                    for ext in sorted(members):  # canonical order: by key, then extension
                        _add(tar, f"{key}.{ext}", members[ext])
    with atomic_path(folder / f"{name}.parquet", suffix=".parquet") as tmp:
        pd.DataFrame(rows).to_parquet(tmp, index=False)
    stats = {
        "count": len(records),
        "successes": status["success"],
        "failed_to_download": len(records) - status["success"],
        "failed_to_resize": 0,
        "status_dict": dict(sorted(status.items())),
    }
    write_json(folder / f"{name}_stats.json", stats)
    return stats


def write_video_shards(records: Iterable[VideoRecord], folder: Path, per_shard: int) -> int:
    """Every record into shards of ``per_shard`` samples in ``folder`` (emptied of shards first); returns
    the number of shards."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("*.tar"), *folder.glob("*.parquet"), *folder.glob("*_stats.json")]:
        old.unlink()
    batch, shard = [], 0
    for rec in records:
        batch.append(rec)
        if len(batch) == per_shard:
            write_shard(batch, folder, shard)
            batch, shard = [], shard + 1
    if batch:
        write_shard(batch, folder, shard)
        shard += 1
    return shard
