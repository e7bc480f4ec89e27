"""URL lists (LAION-style parquet or csv with a URL and a caption column): finding their parts, reading
and validation, and the stable train/test assignment of their rows."""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path

import pandas as pd

from mpe.errors import DataError
from mpe.files.hashing import file_sha256


def _first_undecodable_line(path: Path, encoding: str) -> tuple[int, str]:
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode(encoding)
            except UnicodeDecodeError as err:
                return n, str(err)
    return 0, ""


def _text_column(df: pd.DataFrame, col: str, path: Path) -> pd.Series:
    """A column as strings; bytes values (a binary parquet column) are decoded as UTF-8, and the first row
    that does not decode is named."""
    values = df[col]
    odd = values.map(lambda v: v is not None and not isinstance(v, (str, bytes, bytearray, float, int)))
    if odd.any():  # a list or a struct column would otherwise be written out as its repr
        row = int(odd.to_numpy().nonzero()[0][0])
        raise DataError(
            f"{path}: column '{col}', row {row}: a list or structure ({type(values.iloc[row]).__name__}), "
            "not text; the column must hold strings"
        )
    if values.map(lambda v: isinstance(v, (bytes, bytearray))).any():
        decoded = []
        for i, v in enumerate(values):
            if isinstance(v, (bytes, bytearray)):
                try:
                    v = bytes(v).decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(
                        f"{path}: column '{col}', row {i}: not UTF-8 text ({err.reason} at byte "
                        f"{err.start}); re-encode the column as UTF-8 strings"
                    ) from None
            decoded.append(v)
        values = pd.Series(decoded, index=df.index, dtype="object")
    return values.astype("string").fillna("").str.strip()


def read_url_list(
    path: str | Path, url_col: str, caption_col: str, encoding: str = "utf-8"
) -> tuple[pd.DataFrame, dict]:
    """Read a URL list, check its columns, drop (and count) rows without a URL or caption.

    Returns the clean frame (columns renamed to ``URL``/``TEXT``, other columns kept) and a report
    ``{"rows", "kept", "empty_url", "empty_caption", "empty_caption_rows"}``. A CSV/TSV is read in
    ``encoding``; text that does not decode is an error naming the file, line or column and row.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: URL list not found")
    if path.suffix == ".parquet":
        try:
            df = pd.read_parquet(path)
        except Exception as err:  # pyarrow names no file: a damaged part among many must be named
            raise DataError(f"{path}: not a readable parquet file ({err})") from None
    elif path.suffix in (".csv", ".tsv"):
        try:
            df = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", keep_default_na=False, encoding=encoding)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:  # an unterminated quote, a ragged row
            raise DataError(
                f"{path}: not a readable {path.suffix[1:]} file ({str(err).strip()}); fix the row it names"
            ) from None
        except UnicodeDecodeError:
            line, why = _first_undecodable_line(path, encoding)
            raise DataError(
                f"{path}: line {line} is not {encoding} text ({why}); set data.encoding in "
                "params.yaml (e.g. latin-1) or re-encode the file"
            ) from None
    else:
        raise DataError(f"{path}: expected a .parquet, .csv or .tsv URL list")
    for col, what in ((url_col, "url"), (caption_col, "caption")):
        if col not in df.columns:
            raise DataError(
                f"{path}: no {what} column '{col}' (columns: {', '.join(map(str, df.columns))}); "
                f"set data.{what}_col in params.yaml"
            )
    urls = _text_column(df, url_col, path)
    caps = _text_column(df, caption_col, path)
    empty_url = urls == ""
    empty_cap = (caps == "") & ~empty_url
    report = {
        "rows": int(len(df)),
        "empty_url": int(empty_url.sum()),
        "empty_caption": int(empty_cap.sum()),
        "empty_caption_rows": [int(i) for i in df.index[empty_cap][:20]],
    }
    keep = ~(empty_url | empty_cap)
    out = df[keep].copy()
    out[url_col], out[caption_col] = urls[keep], caps[keep]
    out = out.rename(columns={url_col: "URL", caption_col: "TEXT"})
    report["kept"] = int(len(out))
    if report["kept"] == 0:
        raise DataError(f"{path}: no row has both a URL ('{url_col}') and a caption ('{caption_col}')")
    return out.reset_index(drop=True), report


LIST_SUFFIXES = (".parquet", ".csv", ".tsv")


def list_parts(spec: str | Path) -> list[Path]:
    """The parts of a URL list: the file itself, every parquet/csv/tsv file of a folder, or the files a glob
    matches; sorted by name. A part is named by its file stem, so two parts may not share one."""
    spec = str(spec)
    if Path(spec).is_dir():
        parts = sorted(p for p in Path(spec).iterdir() if p.is_file() and p.suffix in LIST_SUFFIXES)
        if not parts:
            raise DataError(f"{spec}: folder holds no URL list part ({', '.join(LIST_SUFFIXES)})")
    elif glob.has_magic(spec):
        parts = sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())
        if not parts:
            raise DataError(f"{spec}: the glob matches no URL list part")
    else:
        return [Path(spec)]
    seen: dict[str, Path] = {}
    for p in parts:
        if p.stem in seen:
            raise DataError(f"{p}: part name '{p.stem}' also used by {seen[p.stem]}; parts need distinct file names")
        seen[p.stem] = p
    return parts


def part_digests(spec: str | Path) -> dict[str, str]:
    """Every part of a URL list by name, with the sha256 of its bytes: what the data stage's download
    depends on, so a new or changed part, and nothing else, makes the next run download."""
    parts = list_parts(spec)
    missing = [p for p in parts if not p.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: URL list not found")
    return {p.stem: file_sha256(p) for p in parts}


def url_fraction(url: str) -> float:
    """A URL's place in [0, 1), from its sha256: the same on every machine and run."""
    return int.from_bytes(hashlib.sha256(url.encode("utf-8")).digest()[:8], "big") / 2.0**64


def evaluation_rows(urls: pd.Series, fraction: float) -> pd.Series:
    """Which rows of a part are kept for evaluation: those whose URL hash falls below ``fraction``, so a row's
    split never depends on the other rows or parts, and every row of one URL is on the same side. A part
    of two or more distinct URLs where no hash does gives its lowest-hash URL (all of its rows), so every
    part adds to the evaluation set."""
    where = urls.map(url_fraction)
    test = where < fraction
    if urls.nunique() > 1 and not test.any():
        test = where == where.min()  # the URL, not one of its rows: a repeat left in train would leak it
    return test


def repeated_urls(urls: pd.Series) -> dict:
    """How often a part repeats a URL: rows whose URL an earlier row has (each is kept: a row is a sample,
    and a URL may carry several captions), the distinct URLs, and the first few repeated ones."""
    repeats = urls.duplicated()
    return {
        "distinct_urls": int(urls.nunique()),
        "repeated_url_rows": int(repeats.sum()),
        "repeated_urls": [str(u) for u in urls[repeats].unique()[:5]],
    }
