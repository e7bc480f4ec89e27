"""Streaming the samples of a webdataset shard: consecutive tar members grouped by key, read through
``mpe.files.storage`` (local or remote), never the whole shard in memory. One rule for what a sample's
caption is, shared by the cache stage and the training loader, so the two walk a shard in lockstep."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator

from mpe.files import storage

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")


def split_name(member: str) -> tuple[str, str]:
    """``dir/00001234.jpg`` → ``("00001234", "jpg")`` (webdataset's rule: the key ends at the first dot)."""
    base = member.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return key, ext.lower()


def iter_samples(url: str, want=None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` for each sample of a shard in tar order; ``want(ext)`` picks the members
    whose bytes are read (the others are skipped unread)."""
    with storage.open_read(url) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        key, files = None, {}
        for m in tar:
            if not m.isfile():
                continue
            k, ext = split_name(m.name)
            if k != key:
                if key is not None:
                    yield key, files
                key, files = k, {}
            if want is None or want(ext):
                files[ext] = tar.extractfile(m).read()
        if key is not None:
            yield key, files


def caption_of(files: dict[str, bytes]) -> str:
    """The sample's caption: its ``.txt`` as UTF-8 (undecodable bytes replaced), stripped; "" if none."""
    return files.get("txt", b"").decode("utf-8", errors="replace").strip()


def image_of(files: dict[str, bytes]) -> bytes | None:
    ext = next((e for e in IMAGE_EXTS if e in files), None)
    return files[ext] if ext else None


def video_of(files: dict[str, bytes]) -> bytes | None:
    ext = next((e for e in VIDEO_EXTS if e in files), None)
    return files[ext] if ext else None


def captions(url: str) -> Iterator[tuple[str, str]]:
    """``(key, caption)`` of every sample with a non-empty caption, in tar order (images left unread)."""
    for key, files in iter_samples(url, want=lambda ext: ext == "txt"):
        text = caption_of(files)
        if text:
            yield key, text
