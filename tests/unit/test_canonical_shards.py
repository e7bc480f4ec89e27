"""Shards in canonical form: the same samples written in any order, at any time, give the same bytes."""

import io
import tarfile

from mpe.data.canonical_shards import canonicalize_tar, is_canonical


def _tar(path, order, mtime):
    with tarfile.open(path, "w") as t:
        for name in order:
            data = f"content of {name}".encode()
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            t.addfile(info, io.BytesIO(data))


def test_two_download_orders_give_identical_bytes(tmp_path):
    names = [f"{k:08d}.{ext}" for k in (3, 0, 11, 2) for ext in ("jpg", "txt", "json")]
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    _tar(a, names, mtime=1_700_000_000)
    _tar(b, list(reversed(names)), mtime=1_800_000_123)
    assert not is_canonical(a) and a.read_bytes() != b.read_bytes()
    assert canonicalize_tar(a) and canonicalize_tar(b)
    assert a.read_bytes() == b.read_bytes() and is_canonical(a)
    with tarfile.open(a) as t:
        got = [(m.name, t.extractfile(m).read()) for m in t]
    assert [n for n, _ in got][:3] == ["00000000.jpg", "00000000.json", "00000000.txt"]
    assert all(data == f"content of {n}".encode() for n, data in got) and len(got) == len(names)
    assert not canonicalize_tar(a)  # already canonical: left alone


def test_a_shard_s_parquet_has_the_same_bytes_whichever_order_its_rows_were_written_in(tmp_path):
    """img2dataset writes a shard's parquet in the order its threads finished: a download whose rows came in
    key order and one whose rows did not hold the same rows, and a cache shard built from one must stay
    current for the other (its identity holds the parquet's sha256)."""
    import pandas as pd
    import pyarrow as pa
    from img2dataset.writer import BufferedParquetWriter

    from mpe.data.canonical_shards import canonicalize_parquet

    rows = pd.DataFrame({"key": [f"{k:08d}" for k in range(6)], "caption": [f"a caption {k}" for k in range(6)]})
    in_order, shuffled = tmp_path / "in_order.parquet", tmp_path / "shuffled.parquet"
    for path, order in ((in_order, range(6)), (shuffled, [3, 0, 5, 1, 4, 2])):  # img2dataset's own writer
        writer = BufferedParquetWriter(str(path), pa.schema([("key", pa.string()), ("caption", pa.string())]), 4)
        for i in order:
            writer.write(rows.iloc[i].to_dict())
        writer.close()
    assert in_order.read_bytes() != shuffled.read_bytes()
    assert canonicalize_parquet(in_order) and canonicalize_parquet(shuffled)
    assert in_order.read_bytes() == shuffled.read_bytes()
    assert pd.read_parquet(in_order).equals(rows)
    assert not canonicalize_parquet(in_order)  # already canonical: left alone
