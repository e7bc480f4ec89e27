"""Bad input gets a clear error naming the file, row or column, and loses nothing already done."""

import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from mpe.config import DataConfig
from mpe.data.loader import load_split
from mpe.data.prepare import prepare_data
from mpe.data.url_list import read_url_list
from mpe.errors import DataError


def _images(folder: Path, n: int, corrupt: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for i in range(n):
        p = folder / f"{i}.png"
        if i < corrupt:
            p.write_bytes(b"this is not a png")
        else:
            Image.new("RGB", (24, 24), (10 * i, 100, 50)).save(p)
        urls.append(p.resolve().as_uri())
    return urls


def _cfg(tmp_path, url_list, **kw):
    return DataConfig(
        source="url_list",
        url_list=str(url_list),
        out_dir=str(tmp_path / "data"),
        image_size=24,
        test_fraction=0.25,
        **kw,
    )


def test_missing_columns_are_named(tmp_path):
    f = tmp_path / "list.csv"
    pd.DataFrame({"link": ["file:///x.png"], "TEXT": ["a"]}).to_csv(f, index=False)
    with pytest.raises(DataError, match=r"list.csv: no url column 'URL' \(columns: link, TEXT\)"):
        read_url_list(f, "URL", "TEXT")
    pd.DataFrame({"URL": ["file:///x.png"], "text": ["a"]}).to_parquet(tmp_path / "l.parquet")
    with pytest.raises(DataError, match="no caption column 'TEXT'"):
        read_url_list(tmp_path / "l.parquet", "URL", "TEXT")


def test_empty_captions_are_dropped_and_reported(tmp_path):
    urls = _images(tmp_path / "img", 8)
    caps = ["a red circle", "", "a blue square", "   ", "a star", "a cross", "a heart", "a triangle"]
    pd.DataFrame({"url": urls, "caption": caps}).to_parquet(tmp_path / "l.parquet")
    stats = prepare_data(_cfg(tmp_path, tmp_path / "l.parquet", url_col="url", caption_col="caption"), 0)
    rep = stats["url_list_report"]["l"]  # per part, named by its file stem
    assert rep["empty_caption"] == 2 and rep["empty_caption_rows"] == [1, 3] and rep["kept"] == 6
    total = sum(s["successes"] for s in stats["splits"].values())
    assert total == 6


def test_corrupt_images_fail_the_floor_with_counts_by_status(tmp_path):
    urls = _images(tmp_path / "img", 10, corrupt=4)
    pd.DataFrame({"URL": urls, "TEXT": [f"caption {i}" for i in range(10)]}).to_parquet(tmp_path / "l.parquet")
    with pytest.raises(DataError) as err:
        prepare_data(_cfg(tmp_path, tmp_path / "l.parquet", min_success_rate=0.9), 0)
    msg = str(err.value)
    assert "data.min_success_rate" in msg and "by status" in msg and "success:" in msg
    # a lower floor accepts the same shards: nothing downloaded is thrown away
    stats = prepare_data(_cfg(tmp_path, tmp_path / "l.parquet", min_success_rate=0.5), 0)
    assert sum(s["successes"] for s in stats["splits"].values()) == 6


def test_bare_paths_fail_every_row_and_are_caught(tmp_path):
    """img2dataset exits 0 on bare paths but downloads nothing: the stats check stops the stage."""
    urls = [u.removeprefix("file://") for u in _images(tmp_path / "img", 4)]
    pd.DataFrame({"URL": urls, "TEXT": ["a"] * 4}).to_parquet(tmp_path / "l.parquet")
    with pytest.raises(DataError, match=r"0/\d images downloaded"):
        prepare_data(_cfg(tmp_path, tmp_path / "l.parquet"), 0)


def test_loader_skips_and_counts_bad_samples(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    good = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(good, format="JPEG")
    with tarfile.open(folder / "00000.tar", "w") as tar:
        add(tar, "0001.jpg", good.getvalue())
        add(tar, "0001.txt", b"a red square")
        add(tar, "0001.json", json.dumps({"id": "a"}).encode())
        add(tar, "0002.jpg", b"\xff\xd8 truncated jpeg")
        add(tar, "0002.txt", b"a broken image")
        add(tar, "0003.jpg", good.getvalue())
        add(tar, "0003.txt", b"")
    (folder / "00001.tar").write_bytes(b"not a tar archive at all")
    samples, skipped = load_split(folder)
    assert [s.caption for s in samples] == ["a red square"]
    assert skipped["bad_image"] == 1 and skipped["empty_caption"] == 1
    assert sum(v for k, v in skipped.items() if k.startswith("unreadable")) >= 1


def test_undecodable_url_lists_name_the_file_line_column_and_row(tmp_path):
    csv = tmp_path / "list.csv"
    csv.write_bytes("URL,TEXT\nfile:///a.png,a red circle\nfile:///b.png,un caf\xe9 cr\xe8me\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"list.csv: line 3 is not utf-8 text .*data.encoding"):
        read_url_list(csv, "URL", "TEXT")
    df, report = read_url_list(csv, "URL", "TEXT", encoding="latin-1")
    assert list(df["TEXT"]) == ["a red circle", "un café crème"] and report["kept"] == 2
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "URL": ["file:///a.png", "file:///b.png", "file:///c.png"],
            "TEXT": pa.array([b"fine", "caf\xe9".encode("latin-1"), b"ok"], type=pa.binary()),
        }
    )
    pq.write_table(table, tmp_path / "binary.parquet")
    with pytest.raises(DataError, match=r"binary.parquet: column 'TEXT', row 1: not UTF-8 text"):
        read_url_list(tmp_path / "binary.parquet", "URL", "TEXT")


def test_repeated_urls_are_counted_and_said_and_never_split_across_train_and_test(tmp_path, capsys):
    import yaml

    from mpe.cli import main

    urls = _images(tmp_path / "img", 4)
    rows = [urls[i % 4] for i in range(40)]  # 4 distinct URLs, 36 rows repeat one
    pd.DataFrame({"URL": rows, "TEXT": [f"caption {i}" for i in range(40)]}).to_parquet(tmp_path / "l.parquet")
    # a fraction no hash falls below: the part's evaluation rows are those of its lowest-hash URL
    params = {
        "data": {**_cfg(tmp_path, tmp_path / "l.parquet").model_dump(mode="json"), "test_fraction": 1e-9},
        "metrics_dir": str(tmp_path / "metrics"),
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["--params", str(tmp_path / "params.yaml"), "data"]) == 0
    said = capsys.readouterr().out
    assert "l: 36 of 40 rows repeat a URL of an earlier row (4 distinct URLs" in said, said
    rep = json.loads((tmp_path / "metrics" / "data.json").read_text())["url_list_report"]["l"]
    assert rep["repeated_url_rows"] == 36 and rep["distinct_urls"] == 4
    lists = {s: pd.read_parquet(tmp_path / "data" / "url_lists" / s / "l.parquet") for s in ("train", "test")}
    assert set(lists["train"]["URL"]).isdisjoint(lists["test"]["URL"])  # no test image is trained on
    assert (len(lists["train"]), len(lists["test"])) == (30, 10)


def test_a_malformed_csv_and_a_caption_column_of_lists_are_named(tmp_path):
    f = tmp_path / "list.csv"
    f.write_text('URL,TEXT\nfile:///a.png,"an unterminated quote\nfile:///b.png,ok\n')
    with pytest.raises(DataError, match=r"list.csv: not a readable csv file \(.*EOF inside string starting at row 1"):
        read_url_list(f, "URL", "TEXT")
    pd.DataFrame({"URL": ["file:///a.png", "file:///b.png"], "TEXT": [["ok"], ["a", "list"]]}).to_parquet(
        tmp_path / "l.parquet"
    )
    with pytest.raises(DataError, match=r"l.parquet: column 'TEXT', row 0: a list or structure"):
        read_url_list(tmp_path / "l.parquet", "URL", "TEXT")
