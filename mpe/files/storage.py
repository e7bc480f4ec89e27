"""Files by URL: a local path, ``file://``, or any fsspec protocol (``s3://``, ``gs://``, …), so that
shards and cache shards live on storage every node of a cluster reads. Writes are atomic: a temporary
name beside the target, renamed over it when complete (on object stores: uploaded, then moved)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

import fsspec
from fsspec.core import url_to_fs

from mpe.files.atomic import atomic_path


def mpe_home() -> Path:
    """Where mpe keeps machine-wide files (the converted bundled model): ``$MPE_HOME``, default ``~/.cache/mpe``."""
    return Path(os.environ.get("MPE_HOME", Path.home() / ".cache" / "mpe"))


def is_local(url: str | Path) -> bool:
    fs, _ = url_to_fs(str(url))
    return isinstance(fs, fsspec.implementations.local.LocalFileSystem)


def absolute(url: str | Path) -> str:
    """A local path made absolute (workers may run in another directory); a URL as it is."""
    return str(Path(url).resolve()) if "://" not in str(url) else str(url)


def join(url: str | Path, *parts: str) -> str:
    out = str(url).rstrip("/")
    for p in parts:
        out += "/" + str(p).strip("/")
    return out


def name(url: str) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]


def parent(url: str) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[0]


def _fs(url: str | Path):
    return url_to_fs(str(url))


def exists(url: str | Path) -> bool:
    fs, path = _fs(url)
    return fs.exists(path)


def size(url: str | Path) -> int:
    fs, path = _fs(url)
    return int(fs.size(path))


def info(url: str | Path) -> dict:
    """The file system's description of a file (size, modification time, ETag on object stores …)."""
    fs, path = _fs(url)
    return fs.info(path)


def local_path(url: str | Path) -> str:
    """The path of a local file given as a path or a ``file://`` URL."""
    return _fs(url)[1]


def list_files(url: str | Path, suffix: str) -> list[str]:
    """The files directly in folder ``url`` ending in ``suffix``, sorted, as URLs of the same form."""
    fs, path = _fs(url)
    if not fs.isdir(path):
        return []
    found = sorted(p for p in fs.ls(path, detail=False) if p.endswith(suffix) and not name(p).startswith("."))
    return [join(url, name(p)) for p in found]


def open_read(url: str | Path, block_size: int = 8 << 20):
    """A seekable binary file; remote reads go through fsspec's read-ahead cache."""
    fs, path = _fs(url)
    if is_local(url):
        return open(path, "rb")
    return fs.open(path, "rb", block_size=block_size, cache_type="readahead")


def sha256(url: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open_read(url) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_bytes(url: str | Path) -> bytes:
    with open_read(url) as f:
        return f.read()


@contextmanager
def atomic_local_copy(url: str | Path, suffix: str = ""):
    """Yield a local path to write; on success it becomes ``url`` (local: renamed; remote: uploaded to a
    temporary name, then moved), else nothing is left behind."""
    if is_local(url):
        with atomic_path(_fs(url)[1], suffix=suffix) as tmp:
            yield tmp
        return
    fs, path = _fs(url)
    workdir = Path(tempfile.mkdtemp(prefix="mpe-upload-"))
    try:
        tmp = workdir / ("part" + suffix)
        yield tmp
        remote_tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.put_file(str(tmp), remote_tmp)
        fs.mv(remote_tmp, path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def remove_stale_temporaries(url: str | Path, keep: tuple[str, ...] = ()) -> int:
    """Delete the temporary files a killed writer left in folder ``url`` (hidden files, which only our
    atomic writes create there, but the names in ``keep``, and interrupted uploads); returns how many."""
    fs, path = _fs(url)
    if not fs.isdir(path):
        return 0
    stale = [
        p for p in fs.ls(path, detail=False) if (name(p).startswith(".") and name(p) not in keep) or ".tmp-" in name(p)
    ]
    for p in stale:
        fs.rm(p)
    return len(stale)
