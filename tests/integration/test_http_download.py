"""The data stage over HTTP, as in production: img2dataset against a server on 127.0.0.1 serving real
images and the web's failures; outcomes counted by status class; a floor; a killed download resumed."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from mpe.config import Params
from mpe.data.prepare import prepare_data
from mpe.errors import DataError
from tests.http_images import ImageServer
from tests.project_config import small_params

BIN = Path(sys.executable).parent


def _params(root: Path, url_list: Path, **data) -> Params:
    p = small_params(
        root, root / "unused-base", data={"source": "url_list", "url_list": str(url_list), "image_size": 32, **data}
    )
    return Params.model_validate(p)


def _url_fraction(url: str) -> float:
    """The split rule written out independently: the URL's sha256, first 8 bytes, as a fraction of 2**64."""
    return int.from_bytes(hashlib.sha256(url.encode()).digest()[:8], "big") / 2.0**64


def _members(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as t:
        return {m.name: t.extractfile(m).read() for m in t if m.isfile()}


GOOD = {
    f"good-{fmt}-{i}": ((40 + 60 * i, 200 - 50 * i, 30 + 90 * i), fmt)
    for i in range(2)
    for fmt in ("jpg", "png", "webp")
}
# fault → the status class img2dataset's message for it falls in
FAULTS = {
    "missing": "http_4xx",
    "server-error": "http_5xx",
    "slow": "timeout",
    "truncated": "truncated",
    "not-an-image": "not_an_image",
    "noai": "opted_out",
    "huge": "image_too_large",
    "redirect": "success",
}


def test_http_faults_are_counted_by_class_and_the_floor_stops_with_them(tmp_path):
    with ImageServer() as srv:
        rows = [(srv.add_image(f"/{name}.{fmt}", colour, fmt), name) for name, (colour, fmt) in GOOD.items()]
        srv.routes["/missing.jpg"] = ("status:404", b"", "")
        srv.routes["/server-error.jpg"] = ("status:500", b"", "")
        srv.add_image("/slow.jpg", (9, 9, 9), "jpg", kind="slow:15")  # data.timeout is 5 s
        srv.add_image("/target.png", (250, 10, 10))
        srv.routes["/redirect.png"] = ("redirect", b"/target.png", "")
        srv.add_image("/truncated.jpg", (10, 250, 10), "jpg", kind="truncated", size=(300, 200))
        srv.routes["/not-an-image.jpg"] = ("ok", b"<html><body>404 soft</body></html>", "image/jpeg")
        srv.add_image("/noai.png", (10, 10, 250), kind="noai")
        srv.add_image("/huge.png", (120, 120, 120), size=(2100, 2000))  # 4.2 MP > data.max_image_area 4e6
        rows += [(f"{srv.url}/{n}.{'png' if n in ('redirect', 'noai', 'huge') else 'jpg'}", n) for n in FAULTS]
        url_list = tmp_path / "lists"  # a folder of parts, as LAION ships them
        url_list.mkdir()
        pd.DataFrame({"URL": [u for u, _ in rows], "TEXT": [n for _, n in rows]}).to_parquet(
            url_list / "faults.parquet"
        )
        kw = dict(timeout=5, max_image_area=4e6, test_fraction=0.3, threads=16)

        from mpe.stages import data as data_stage

        with pytest.raises(DataError) as err:
            data_stage.run(_params(tmp_path, url_list, min_success_rate=0.9, **kw))
        msg = str(err.value)
        assert "7/14 images downloaded (50.0% < data.min_success_rate 90%)" in msg, msg
        for cls in set(FAULTS.values()) - {"success"}:
            assert f"{cls}: 1" in msg, (cls, msg)
        assert "success: 7" in msg
        fetched = dict(srv.counts)

        # a lower floor accepts what was downloaded: nothing is fetched again
        stats = data_stage.run(_params(tmp_path, url_list, min_success_rate=0.4, **kw))
        assert dict(srv.counts) == fetched
        metrics = json.loads((tmp_path / "metrics" / "data.json").read_text())

        # a new part: only it is fetched; the shards of the part already there do not change
        shards_before = _tar_hashes(tmp_path / "data")
        eval_before = pd.read_parquet(tmp_path / "data" / "url_lists" / "test" / "faults.parquet")
        extra_url = srv.add_image("/extra.png", (200, 200, 0))
        pd.DataFrame({"URL": [extra_url], "TEXT": ["extra"]}).to_parquet(url_list / "extra.parquet")
        # a one-row part goes where its URL's hash sends it (the server's port is random: either split)
        extra_split = "test" if _url_fraction(extra_url) < kw["test_fraction"] else "train"
        grown = data_stage.run(_params(tmp_path, url_list, min_success_rate=0.4, **kw))
        assert dict(srv.counts) == {**fetched, "/extra.png": 1}
    assert grown["parts"] == {"faults": {"train": "kept", "test": "kept"}, "extra": {extra_split: "downloaded"}}
    after = _tar_hashes(tmp_path / "data")
    assert {k: after[k] for k in shards_before} == shards_before and len(after) == len(shards_before) + 1
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "data" / "url_lists" / "test" / "faults.parquet"), eval_before
    )  # the evaluation rows did not move
    assert stats["parts"] == {"faults": {"train": "kept", "test": "kept"}}
    expected = {"success": 7, **{c: 1 for c in set(FAULTS.values()) - {"success"}}}
    assert metrics["outcomes"]["status_class"] == expected
    assert sum(s["count"] for s in metrics["splits"].values()) == 14
    assert fetched["/redirect.png"] == 1 and fetched["/target.png"] == 1
    assert all(n == 1 for p, n in fetched.items()), fetched  # no retries (data.retries: 0)

    # independent reference: each saved image has the colour the server sent for its caption
    colours = {name: c for name, (c, _) in GOOD.items()} | {"redirect": (250, 10, 10), "extra": (200, 200, 0)}
    seen = set()
    for tar in (tmp_path / "data" / "shards").glob("*/*.tar"):
        m = _members(tar)
        for key in {n.split(".")[0] for n in m}:
            caption = m[f"{key}.txt"].decode()
            img = np.asarray(Image.open(io.BytesIO(m[f"{key}.jpg"])).convert("RGB"), dtype=float)
            centre = img[12:20, 12:20].reshape(-1, 3).mean(0)  # border padding lies outside the centre
            assert np.abs(centre - colours[caption]).max() < 12, (caption, centre)
            seen.add(caption)
    assert seen == set(colours)


def _tar_hashes(root: Path) -> dict[str, str]:
    from mpe.files.hashing import file_sha256

    return {str(t.relative_to(root)): file_sha256(t) for t in root.glob("shards/*/*.tar")}


def test_a_killed_download_resumes_without_fetching_saved_images_again(tmp_path):
    n, per_shard = 40, 4
    with ImageServer() as srv:
        urls = [srv.add_image(f"/k/{i}.png", (6 * i, 255 - 6 * i, 100)) for i in range(n)]
        srv.gated = {f"/k/{i}.png" for i in range(20, n)}  # held until the stage is killed
        url_list = tmp_path / "big.parquet"
        pd.DataFrame({"URL": urls, "TEXT": [f"image {i}" for i in range(n)]}).to_parquet(url_list)
        p = _params(tmp_path, url_list, samples_per_shard=per_shard, threads=4, timeout=60, test_fraction=0.01)
        params_file = tmp_path / "params.yaml"
        params_file.write_text(yaml.safe_dump(p.model_dump(mode="json", by_alias=True)))
        staging = tmp_path / "data" / "downloads" / "train" / "big"
        proc = subprocess.Popen(
            [str(BIN / "mpe"), "--params", str(params_file), "data"],
            cwd=tmp_path,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 240
            while len(list(staging.glob("*_stats.json"))) < 4:
                assert proc.poll() is None, "the stage ended before it was killed"
                assert time.monotonic() < deadline, "no four finished shards"
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the stage and img2dataset's worker processes
            proc.wait()
        finished = sorted(f.name.removesuffix("_stats.json") for f in staging.glob("*_stats.json"))
        before = {s: _members(staging / f"{s}.tar") for s in finished}
        saved = set()
        for s in finished:
            rows = pd.read_parquet(staging / f"{s}.parquet")
            assert (rows["status"] == "success").all()
            saved |= {u.removeprefix(srv.url) for u in rows["url"]}
        assert len(finished) >= 4 and len(saved) == len(finished) * per_shard  # whole shards only (the gate holds 20+)
        srv.gate.set()

        stats = prepare_data(p.data, 0)
        counts = dict(srv.counts)
    assert stats["outcomes"]["successes"] == n and stats["parts"]["big"] == {
        "train": "downloaded",
        "test": "downloaded",
    }
    assert all(counts[path] == 1 for path in saved), {p: counts[p] for p in saved if counts[p] != 1}
    assert set(counts) == {f"/k/{i}.png" for i in range(n)}
    shards = tmp_path / "data" / "shards" / "train"
    for s in finished:  # what was downloaded before the kill is what the data stage keeps
        assert _members(shards / f"big-{s}.tar") == before[s]
    assert not (tmp_path / "data" / "downloads").exists()
