"""img2dataset's pyspark distributor (``data.distributor: pyspark``): a local Spark session of two executor
cores (the one img2dataset starts when none is active, ``local[data.processes]``, its Python workers the
running interpreter) downloads a URL list served on 127.0.0.1 into the very shards the multiprocessing
distributor writes: the same shard names, keys, captions and statuses, and the same bytes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mpe.config import Params
from mpe.data.prepare import prepare_data
from tests.http_images import ImageServer
from tests.project_config import small_params


def _shards(data: Path) -> dict[str, tuple[bytes, list]]:
    out = {}
    for tar in sorted(data.glob("shards/*/*.tar")):
        rows = pd.read_parquet(tar.with_suffix(".parquet"))
        out[str(tar.relative_to(data))] = (tar.read_bytes(), rows[["key", "caption", "status"]].values.tolist())
    return out


def test_the_pyspark_distributor_downloads_the_multiprocessing_distributor_s_shards(tmp_path):
    n = 14
    with ImageServer() as srv:
        urls = [srv.add_image(f"/s/{i}.png", (7 * i, 240 - 7 * i, 60 + 5 * i)) for i in range(n)]
        lists = tmp_path / "lists"
        lists.mkdir()
        pd.DataFrame({"URL": urls, "TEXT": [f"image {i}" for i in range(n)]}).to_parquet(lists / "part.parquet")
        got = {}
        for distributor in ("multiprocessing", "pyspark"):
            root = tmp_path / distributor
            data = {"source": "url_list", "url_list": str(lists / "part.parquet"), "samples_per_shard": 4}
            p = small_params(root, root / "unused-base", data={**data, "distributor": distributor, "processes": 2})
            stats = prepare_data(Params.model_validate(p).data, 0)
            assert stats["outcomes"]["successes"] == n
            got[distributor] = _shards(root / "data")
        assert sum(srv.counts.values()) == 2 * n  # each distributor fetched every image once
    want = got["multiprocessing"]
    assert len(want) >= 4 and got["pyspark"].keys() == want.keys()
    for name in want:
        assert got["pyspark"][name][1] == want[name][1], name
        assert got["pyspark"][name][0] == want[name][0], name
