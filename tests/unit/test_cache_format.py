"""The cache format on its own: exact write/read round trip, atomic parts, key and manifest rules."""

import json

import pytest
import torch

from mpe.cache_store import HiddenStateCache, cache_key, caption_sha
from mpe.errors import CacheMismatch

FIELDS = {"format": 1, "model_sha256": "abc", "dtype": "float16", "num_prompts": 2}


def test_round_trip_is_exact_in_storage_precision(tmp_path):
    c = HiddenStateCache.for_config(tmp_path, FIELDS)
    texts = ["a red circle", "a blue square on a striped background", ""]
    states = [torch.randn(n, 8) * 50 for n in (5, 9, 3)]
    c.write_part(texts, states, [2, 6, 0])
    again = HiddenStateCache.for_config(tmp_path, FIELDS)  # a new reader sees the same
    for t, s, n in zip(texts, states, [2, 6, 0]):
        got, cap = again.get(t)
        assert cap == n and got.dtype == torch.float16 and torch.equal(got, s.half())
    padded, lens = again.batch(texts)
    assert padded.shape == (3, 9, 8) and lens == [2, 6, 0]
    assert torch.equal(padded[0, 4:], states[0].half().float()) and (padded[0, :4] == 0).all()
    assert again.missing(texts + ["new", "new"]) == ["new"]


def test_incomplete_part_is_ignored_and_recomputed(tmp_path):
    c = HiddenStateCache.for_config(tmp_path, FIELDS)
    c.write_part(["a"], [torch.ones(2, 4)], [1])
    c.write_part(["b"], [torch.ones(2, 4)], [1])
    (c.folder / "part-00001.safetensors").unlink()  # killed between the two renames
    again = HiddenStateCache.for_config(tmp_path, FIELDS)
    assert "a" in again and "b" not in again


def test_key_and_manifest(tmp_path):
    assert cache_key(FIELDS) != cache_key({**FIELDS, "num_prompts": 3})
    c = HiddenStateCache.for_config(tmp_path, FIELDS)
    assert json.loads((c.folder / "manifest.json").read_text()) == FIELDS
    with pytest.raises(CacheMismatch, match="differs in: dtype"):
        HiddenStateCache(c.folder, {**FIELDS, "dtype": "bfloat16"})
    with pytest.raises(KeyError, match="not in cache"):
        c.get("never written")
    assert len(caption_sha("x")) == 64


def test_float16_overflow_is_refused(tmp_path):
    c = HiddenStateCache.for_config(tmp_path, FIELDS)
    with pytest.raises(OverflowError, match="bfloat16"):
        c.write_part(["x"], [torch.full((2, 4), 1e6)], [1])
    assert len(c) == 0 and not list(c.folder.glob("part-*"))
