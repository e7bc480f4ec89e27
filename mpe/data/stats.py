"""The data stage's counts: img2dataset's per-shard stats summed per split, and ``stats.json``."""

from __future__ import annotations

import json
from pathlib import Path

from mpe import storage
from mpe.errors import StageInputError

STATS_FILE = "stats.json"


def shard_stats(folder: Path) -> dict:
    """Sum img2dataset's ``*_stats.json`` files: counts, successes and every status."""
    total = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0, "status": {}}
    for f in sorted(folder.glob("*_stats.json")):
        s = json.loads(f.read_text())
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            total[k] += int(s.get(k, 0))
        for status, n in (s.get("status_dict") or {}).items():
            total["status"][status] = total["status"].get(status, 0) + int(n)
    total["success_rate"] = total["successes"] / total["count"] if total["count"] else 0.0
    return total


def read_stats(out: str | Path) -> dict:
    """The ``stats.json`` the data stage wrote into ``out`` (a folder or URL)."""
    url = storage.join(out, STATS_FILE)
    if not storage.exists(url):
        raise StageInputError(f"{url}: not found; run `mpe data` first")
    return json.loads(storage.read_bytes(url))
