"""Stage ``data``: the URL lists (the synthetic shapes world, or a user's LAION-style list in parts) downloaded
by img2dataset into webdataset shards; outcomes by status class, and a floor on the success rate."""

from __future__ import annotations

from mpe.config import Params
from mpe.data.prepare import prepare_data
from mpe.files.atomic import write_json
from mpe.records import DATA, metrics_file


def run(params: Params) -> dict:
    stats = prepare_data(params.data, params.seed, params.ray)
    write_json(metrics_file(params.metrics_dir, DATA), stats)
    return stats
