"""Stage ``data``: the URL lists (the synthetic shapes world, or a user's LAION-style list in parts) downloaded
by img2dataset into webdataset shards; outcomes by status class, and a floor on the success rate."""

from __future__ import annotations

from pathlib import Path

from mpe.atomic import write_json
from mpe.config import Params
from mpe.data.prepare import prepare_data


def run(params: Params) -> dict:
    stats = prepare_data(params.data, params.seed)
    write_json(Path(params.evaluate.out_dir) / "data.json", stats)
    return stats
