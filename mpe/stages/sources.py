"""Stage ``sources``: what the data stage will read, listed and hashed, every run (DVC
``always_changed``). A user's URL list is a folder or glob of parts that grows between runs, which DVC
cannot see through params alone; this stage writes the parts' names and hashes to
``metrics/sources.json``, a dep of the data stage, so a new part reruns the data stage and an unchanged
list leaves every later stage skipped."""

from __future__ import annotations

from mpe.config import Params
from mpe.data.url_list import part_digests
from mpe.files.atomic import write_json
from mpe.records import SOURCES, metrics_file


def run(params: Params) -> dict:
    listing = {"source": params.data.source, "parts": {}}
    if params.data.source == "url_list":  # the shapes world is made from params alone: nothing to list
        listing["parts"] = part_digests(params.data.url_list)
    write_json(metrics_file(params.metrics_dir, SOURCES), listing)
    return listing
