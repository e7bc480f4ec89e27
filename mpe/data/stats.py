"""The data stage's counts: img2dataset's per-shard stats summed per split, its status messages grouped
into classes, and ``stats.json``."""

from __future__ import annotations

import json
from pathlib import Path

from mpe.errors import DataError, StageInputError
from mpe.files import storage
from mpe.files.verified import Record, signature

STATS_FILE = "stats.json"


# img2dataset reports each failure by its exception's text; (class, substrings of the lower-cased text)
STATUS_CLASSES = (
    ("http_4xx", ("http error 4",)),
    ("http_5xx", ("http error 5",)),
    ("timeout", ("timed out",)),
    ("opted_out", ("x-robots-tag",)),
    ("truncated", ("incompleteread", "incomplete read")),
    ("not_an_image", ("image decoding error",)),
    ("image_too_large", ("image area too large",)),
    ("image_size_filtered", ("image too small", "aspect ratio too large")),
    ("bad_url", ("unknown url type", "no host given")),
    ("connection", ("urlopen error", "connection", "remote end closed", "no such file")),
)


def status_class(message: str) -> str:
    """The class of one img2dataset status or error message (``other`` when none fits)."""
    text = message.lower()
    if text == "success":
        return "success"
    return next((name for name, needles in STATUS_CLASSES if any(n in text for n in needles)), "other")


def by_class(status: dict[str, int]) -> dict[str, int]:
    """Status counts summed by class."""
    out: dict[str, int] = {}
    for message, n in status.items():
        out[status_class(message)] = out.get(status_class(message), 0) + n
    return dict(sorted(out.items()))


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
    total["status_class"] = by_class(total["status"])
    return total


def read_stats(out: str | Path) -> dict:
    """The ``stats.json`` the data stage wrote into ``out`` (a folder or URL)."""
    url = storage.join(out, STATS_FILE)
    if not storage.exists(url):
        raise StageInputError(f"{url}: not found; run `mpe data` first")
    return json.loads(storage.read_bytes(url))


def data_identity(stats: dict) -> dict:
    """What the data is, for a training run's identity: the source, and each split's counts and shards (names,
    sizes, sha256). Not how it came to be so: the shards a rerun repaired, the parts it downloaded or kept,
    which change nothing a model trains on (a shard repaired to its recorded bytes is the same data)."""
    return {
        "source": stats.get("source"),
        "splits": {
            split: {k: s[k] for k in ("count", "successes", "shards") if k in s}
            for split, s in sorted((stats.get("splits") or {}).items())
        },
    }


def shard_manifest(folder: str | Path) -> dict[str, dict]:
    """``{shard name: {"size", "sha256"}}`` of the finished shards in ``folder``: what later stages check.
    Each shard is recorded as verified as it is hashed, so the next stage start does not read it again."""
    record, manifest = Record(str(folder)), {}
    for url in storage.list_files(str(folder), ".tar"):
        before = signature(url)
        manifest[storage.name(url)] = {"size": storage.size(url), "sha256": storage.sha256(url)}
        record.add(url, manifest[storage.name(url)]["sha256"], before)
    record.save()
    return manifest


def _shard_problem(url: str | None, info: dict | None, record: Record) -> str | None:
    """What is wrong with one shard against its manifest entry, or None. Its size is always compared; its
    sha256 only when the file changed since its content was last verified (:mod:`mpe.files.verified`)."""
    if url is None:
        return "missing"
    if info is None:
        return "not written by the data stage"
    size = storage.size(url)
    if size != info["size"]:
        return f"{size} bytes, expected {info['size']}"
    if record.holds(url, info["sha256"]):
        return None
    before = signature(url)
    if storage.sha256(url) != info["sha256"]:
        return "its sha256 is not the one the data stage recorded (its bytes changed, at the same size)"
    record.add(url, info["sha256"], before)
    return None


def verified_shards(data_root: str | Path, split: str, skip_corrupt: bool = False) -> tuple[list[str], list[str]]:
    """The split's shards whose bytes are those the data stage recorded (size, and sha256 when the file
    changed since it was last verified), and the names of those that are not (truncated, overwritten,
    replaced, missing). A bad shard is an error naming it, unless ``skip_corrupt`` (then it is left out and
    returned, for the caller to count)."""
    folder = storage.join(data_root, "shards", split)
    manifest = read_stats(data_root)["splits"].get(split, {}).get("shards")
    urls = storage.list_files(folder, ".tar")
    if manifest is None:  # data written before shard manifests existed: nothing to check against
        return urls, []
    present = {storage.name(u): u for u in urls}
    record = Record(folder)
    problems = {n: _shard_problem(present.get(n), manifest.get(n), record) for n in sorted({*manifest, *present})}
    record.save()
    bad = [n for n, problem in problems.items() if problem]
    if bad and not skip_corrupt:
        raise DataError(
            f"{storage.join(folder, bad[0])}: {problems[bad[0]]} ({len(bad)} bad shard(s) in "
            f"{split}); rerun `mpe data` to repair, or set data.skip_corrupt_shards: true to leave "
            "them out"
        )
    return [present[n] for n in sorted(present) if n not in bad], bad
