"""LAION metadata filters: rows dropped by CLIP similarity, NSFW and watermark probability, size and aspect
ratio before anything is downloaded, with the count each filter dropped."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mpe.config import MetadataFilterConfig
from mpe.errors import DataError

# filter key → the LAION columns it reads
COLUMNS = {
    "min_similarity": ("similarity",),
    "max_punsafe": ("punsafe",),
    "max_pwatermark": ("pwatermark",),
    "min_image_size": ("WIDTH", "HEIGHT"),
    "max_aspect_ratio": ("WIDTH", "HEIGHT"),
}


def _numeric(df: pd.DataFrame, col: str, key: str, path: Path) -> pd.Series:
    if col not in df.columns:
        raise DataError(
            f"{path}: data.filters.{key} is set but the list has no column '{col}' "
            f"(columns: {', '.join(map(str, df.columns))})"
        )
    return pd.to_numeric(df[col], errors="coerce")


def filter_rows(df: pd.DataFrame, cfg: MetadataFilterConfig, path: Path) -> tuple[pd.DataFrame, dict[str, int]]:
    """The rows of ``df`` every set filter keeps, and per filter how many rows it dropped (a row failing
    several filters is counted by the first). A missing value fails the filter that reads it."""
    keep = pd.Series(True, index=df.index)
    dropped: dict[str, int] = {}
    for key in COLUMNS:
        limit = getattr(cfg, key)
        if limit is None:
            continue
        cols = [_numeric(df, c, key, path) for c in COLUMNS[key]]
        if key == "min_similarity":
            ok = cols[0] >= limit
        elif key in ("max_punsafe", "max_pwatermark"):
            ok = cols[0] <= limit
        elif key == "min_image_size":
            ok = pd.concat(cols, axis=1).min(axis=1) >= limit
        else:
            both = pd.concat(cols, axis=1)
            ok = both.max(axis=1) <= limit * both.min(axis=1)
        ok = ok.fillna(False).astype(bool)
        dropped[key] = int((keep & ~ok).sum())
        keep &= ok
    return df[keep].reset_index(drop=True), dropped
