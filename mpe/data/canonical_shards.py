"""Shards in a canonical form: members in sample-key order with neutral tar headers.

img2dataset's download threads write samples in the order they finish, and stamp each member with
the time of writing, so the same URL list gives differently ordered (and different) bytes on every
download. Training streams shards in order, so that would make a run differ from a rerun of the very
same inputs. Each finished shard is rewritten once, key by key, members read by offset (memory stays
at one member), and replaced atomically; the shard's parquet is sorted by key and written by one writer
with fixed options, so its bytes too depend only on its rows.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from mpe.files.atomic import atomic_path


def _sample_key(name: str) -> tuple[str, str]:
    stem, _, ext = name.rpartition("/")[2].partition(".")
    return stem, ext


def is_canonical(tar: Path) -> bool:
    with tarfile.open(tar) as t:
        names = [(m.name, m.mtime) for m in t]
    return all(mtime == 0 for _, mtime in names) and [n for n, _ in names] == sorted(
        (n for n, _ in names), key=_sample_key
    )


def canonicalize_tar(tar: Path) -> bool:
    """Rewrite ``tar`` in key order with zeroed times and owners; False when it already was."""
    if is_canonical(tar):
        return False
    with tarfile.open(tar) as src, atomic_path(tar, suffix=".tar") as tmp:
        members = sorted((m for m in src if m.isfile()), key=lambda m: _sample_key(m.name))
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as dst:
            for m in members:
                info = tarfile.TarInfo(m.name)
                info.size, info.mode, info.mtime = m.size, 0o644, 0
                dst.addfile(info, src.extractfile(m))
    return True


def canonical_parquet_bytes(path: Path) -> bytes:
    """The bytes of ``path``'s rows sorted by key, written by one writer with fixed options: the same rows give
    the same bytes whichever order, and whichever writer, they came in."""
    import io

    import pandas as pd

    df = pd.read_parquet(path)
    if "key" in df.columns:
        df = df.sort_values("key", kind="stable")
    out = io.BytesIO()
    df.to_parquet(out, index=False, compression="snappy")
    return out.getvalue()


def canonicalize_parquet(path: Path) -> bool:
    """Rewrite a shard's parquet in canonical form (:func:`canonical_parquet_bytes`); False when it already was.
    Sorting alone is not enough: a download whose threads happened to finish in key order keeps img2dataset's
    own file, whose bytes differ from a sorted rewrite of the same rows, and a cache shard names those bytes."""
    data = canonical_parquet_bytes(path)
    if path.read_bytes() == data:
        return False
    with atomic_path(path, suffix=".parquet") as tmp:
        tmp.write_bytes(data)
    return True


def canonicalize_folder(folder: Path) -> int:
    """Every shard (and its parquet) in ``folder`` in canonical form; returns how many were rewritten."""
    n = 0
    for tar in sorted(Path(folder).glob("*.tar")):
        n += canonicalize_tar(tar)
        if tar.with_suffix(".parquet").exists():
            canonicalize_parquet(tar.with_suffix(".parquet"))
    return n
