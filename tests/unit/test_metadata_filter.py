"""LAION metadata filters and URL lists in parts: counts against a row-by-row reference, errors naming
the part file and the column, and a train/test assignment that does not depend on other rows."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mpe.config import DataConfig, MetadataFilterConfig
from mpe.data.metadata_filter import filter_rows
from mpe.data.prepare import split_url_list
from mpe.data.url_list import evaluation_rows, list_parts
from mpe.errors import DataError


def _laion(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "URL": [f"http://127.0.0.1/{seed}/{i}.jpg" for i in range(n)],
            "TEXT": [f"caption {i}" for i in range(n)],
            "WIDTH": rng.integers(50, 1200, n),
            "HEIGHT": rng.integers(50, 1200, n),
            "similarity": rng.uniform(0.15, 0.45, n),
            "punsafe": rng.uniform(0, 1, n),
            "pwatermark": rng.uniform(0, 1, n),
        }
    )


def test_each_filter_drops_what_a_row_by_row_check_drops(tmp_path):
    df = _laion(400)
    df.loc[3, "similarity"] = None  # a missing value fails its filter
    cfg = MetadataFilterConfig(
        min_similarity=0.28, max_punsafe=0.5, max_pwatermark=0.8, min_image_size=200, max_aspect_ratio=2.0
    )
    kept, dropped = filter_rows(df, cfg, tmp_path / "p.parquet")
    checks = [
        ("min_similarity", lambda r: r.similarity >= 0.28),
        ("max_punsafe", lambda r: r.punsafe <= 0.5),
        ("max_pwatermark", lambda r: r.pwatermark <= 0.8),
        ("min_image_size", lambda r: min(r.WIDTH, r.HEIGHT) >= 200),
        ("max_aspect_ratio", lambda r: max(r.WIDTH, r.HEIGHT) / min(r.WIDTH, r.HEIGHT) <= 2.0),
    ]
    want, ref = {k: 0 for k, _ in checks}, []
    for r in df.itertuples():
        failed = next((k for k, ok in checks if not ok(r)), None)  # counted by the first filter it fails
        if failed:
            want[failed] += 1
        else:
            ref.append(r.URL)
    assert dropped == want and list(kept["URL"]) == ref and all(v > 0 for v in want.values())
    assert filter_rows(df, MetadataFilterConfig(), tmp_path / "p.parquet")[1] == {}


def test_parts_of_a_folder_or_glob_and_errors_naming_part_and_column(tmp_path):
    lists = tmp_path / "laion"
    lists.mkdir()
    _laion(30, 0).to_parquet(lists / "part-00000.parquet")
    _laion(30, 1).drop(columns=["punsafe"]).to_parquet(lists / "part-00001.parquet")
    assert [p.name for p in list_parts(lists)] == ["part-00000.parquet", "part-00001.parquet"]
    assert [p.name for p in list_parts(f"{lists}/part-*.parquet")] == ["part-00000.parquet", "part-00001.parquet"]
    with pytest.raises(DataError, match="glob matches no URL list part"):
        list_parts(f"{lists}/nothing-*.parquet")
    cfg = DataConfig(
        source="url_list",
        url_list=str(lists),
        out_dir=str(tmp_path / "data"),
        test_fraction=0.2,
        filters={"max_punsafe": 0.5},
    )
    with pytest.raises(
        DataError,
        match=r"part-00001.parquet: data.filters.max_punsafe is set but the list has "
        r"no column 'punsafe'",
    ):
        split_url_list(cfg, tmp_path / "data")
    (lists / "part-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="part-00001.parquet: not a readable parquet file"):
        split_url_list(cfg.model_copy(update={"filters": MetadataFilterConfig()}), tmp_path / "data")


def test_a_rows_split_does_not_depend_on_other_rows():
    a = _laion(200, 0)["URL"]
    alone = evaluation_rows(a, 0.1)
    with_more = evaluation_rows(pd.concat([a, _laion(300, 1)["URL"]], ignore_index=True), 0.1)
    assert list(with_more[:200]) == list(alone) and 5 < alone.sum() < 40
    tiny = pd.Series(["http://127.0.0.1/x.jpg", "http://127.0.0.1/y.jpg"])
    assert evaluation_rows(tiny, 1e-9).sum() == 1  # every part of two rows or more adds to the evaluation set


def test_test_parts_pin_the_test_split_as_parts_are_added(tmp_path):
    """By default every new part adds its hash-chosen rows to the test split; with ``data.test_parts`` the
    split is those parts' rows alone, the same before and after a part is added, and a part it names that
    does not exist is an error naming the key."""
    lists = tmp_path / "laion"
    lists.mkdir()
    _laion(60, 0).to_parquet(lists / "part-00000.parquet")
    _laion(60, 1).to_parquet(lists / "part-00001.parquet")
    grown = DataConfig(source="url_list", url_list=str(lists), out_dir=str(tmp_path / "a"), test_fraction=0.2)
    pinned = grown.model_copy(update={"out_dir": str(tmp_path / "b"), "test_parts": ["part-00000.parquet"]})

    def test_urls(cfg) -> set[str]:
        parts, _ = split_url_list(cfg, Path(cfg.out_dir))
        return {u for p in parts.values() if "test" in p for u in pd.read_parquet(p["test"])["URL"]}

    def train_urls(cfg) -> set[str]:
        parts, _ = split_url_list(cfg, Path(cfg.out_dir))
        return {u for p in parts.values() if "train" in p for u in pd.read_parquet(p["train"])["URL"]}

    first = _laion(60, 0)["URL"]
    reference = set(first[evaluation_rows(first, 0.2)])  # the documented rule, applied to the pinned part alone
    before_grown, before_pinned = test_urls(grown), test_urls(pinned)
    assert before_pinned == reference and before_grown > before_pinned
    _laion(60, 2).to_parquet(lists / "part-00002.parquet")  # a new part arrives
    assert test_urls(grown) > before_grown  # the default test split grew
    assert test_urls(pinned) == before_pinned  # the pinned one did not
    every = {u for seed in (0, 1, 2) for u in _laion(60, seed)["URL"]}
    assert train_urls(pinned) == every - before_pinned  # rows of the other parts all train
    with pytest.raises(DataError, match=r"data.test_parts: no part named part-00009 in .*part-00000"):
        split_url_list(pinned.model_copy(update={"test_parts": ["part-00009"]}), tmp_path / "c")
    with pytest.raises(ValueError, match="test_parts"):
        DataConfig(test_parts=["part-00000"])  # the shapes world has no parts
