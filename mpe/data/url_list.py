"""URL lists (LAION-style parquet or csv with a URL and a caption column): reading and validation."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mpe.errors import DataError


def read_url_list(path: str | Path, url_col: str, caption_col: str) -> tuple[pd.DataFrame, dict]:
    """Read a URL list, check its columns, drop (and count) rows without a URL or caption.

    Returns the clean frame (columns renamed to ``URL``/``TEXT``, other columns kept) and a report
    ``{"rows", "kept", "empty_url", "empty_caption", "empty_caption_rows"}``.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: URL list not found")
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
    elif path.suffix in (".csv", ".tsv"):
        df = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", keep_default_na=False)
    else:
        raise DataError(f"{path}: expected a .parquet, .csv or .tsv URL list")
    for col, what in ((url_col, "url"), (caption_col, "caption")):
        if col not in df.columns:
            raise DataError(f"{path}: no {what} column '{col}' (columns: {', '.join(map(str, df.columns))}); "
                            f"set data.{what}_col in params.yaml")
    urls = df[url_col].astype("string").fillna("").str.strip()
    caps = df[caption_col].astype("string").fillna("").str.strip()
    empty_url = urls == ""
    empty_cap = (caps == "") & ~empty_url
    report = {"rows": int(len(df)), "empty_url": int(empty_url.sum()), "empty_caption": int(empty_cap.sum()),
              "empty_caption_rows": [int(i) for i in df.index[empty_cap][:20]]}
    keep = ~(empty_url | empty_cap)
    out = df[keep].copy()
    out[url_col], out[caption_col] = urls[keep], caps[keep]
    out = out.rename(columns={url_col: "URL", caption_col: "TEXT"})
    report["kept"] = int(len(out))
    if report["kept"] == 0:
        raise DataError(f"{path}: no row has both a URL ('{url_col}') and a caption ('{caption_col}')")
    return out.reset_index(drop=True), report
