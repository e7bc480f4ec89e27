"""The cache shard format on its own: exact round trips in each storage dtype (read back by our reader
and by safetensors' own), out-of-order writes, the key and manifest rules, corrupt files named."""

import json

import pytest
import torch
from safetensors import safe_open

from mpe.cache.store import (
    STORAGE,
    CacheCorrupt,
    CacheFolder,
    CacheOverflow,
    ShardReader,
    ShardWriter,
    cache_key,
    encode,
    open_active,
    text_digest,
)
from mpe.errors import CacheMismatch, StageInputError

FIELDS = {"format": 2, "model_sha256": "abc", "dtype": "float16", "num_prompts": 2, "compute_dtype": "float32"}
TOLERANCE = {"float32": 0.0, "float16": 1e-3, "bfloat16": 8e-3, "float8_e4m3_row": 0.07, "float8_e4m3_tensor": 0.07}


def _write(path, dtype, states, lens, seg, order=None):
    texts = [f"text {i}" for i in range(len(lens))]
    w = ShardWriter(
        path,
        STORAGE[dtype],
        states[0].shape[1],
        lens,
        seg,
        [text_digest(t) for t in texts],
        [0, 1, 1, 2][: len(lens) + 1],
        {"keys": json.dumps(["k0", "k1", "k2", "k3"][: len(lens) + 1])},
    )
    for u in order or range(len(lens)):
        w.write_caption(u, states[u])
    w.close()
    return texts


@pytest.mark.parametrize("dtype", list(STORAGE))
def test_round_trip_in_each_storage_dtype(tmp_path, dtype):
    torch.manual_seed(0)
    lens, seg = [2, 6, 0], 3
    states = [torch.randn(c + seg, 8) * 40 for c in lens]
    path = tmp_path / "s.safetensors"
    texts = _write(path, dtype, states, lens, seg, order=[2, 0, 1])  # written out of order
    r = ShardReader(str(path))
    assert r.keys == ["k0", "k1", "k2", "k3"] and r.sample_text.tolist() == [0, 1, 1, 2]
    assert r.caption_lens.tolist() == lens
    for u, s in enumerate(states):
        rel = ((r.rows(u) - s).abs().max() / s.abs().max()).item()
        assert rel <= TOLERANCE[dtype], (dtype, u, rel)
        assert bytes(r.text_sha256[u].tolist()) == text_digest(texts[u])
    with safe_open(str(path), "pt") as f:  # an independent reader of the same file
        stored = f.get_tensor("states")
        assert stored.dtype == STORAGE[dtype].torch and stored.shape == (sum(lens) + 3 * seg, 8)
        assert f.metadata()["format"] == "2"
    if dtype == "float16":
        assert torch.equal(stored[: lens[0] + seg].float(), states[0].half().float())


def test_a_caption_never_written_fails_the_shard(tmp_path):
    w = ShardWriter(
        tmp_path / "s.safetensors",
        STORAGE["float16"],
        4,
        [1, 1],
        1,
        [text_digest("a"), text_digest("b")],
        [0, 1],
        {"keys": json.dumps(["a", "b"])},
    )
    w.write_caption(0, torch.ones(2, 4))
    with pytest.raises(ValueError, match="never written"):
        w.close()


def test_truncated_or_garbage_files_are_named(tmp_path):
    path = tmp_path / "s.safetensors"
    _write(path, "float16", [torch.ones(3, 4), torch.ones(4, 4)], [1, 2], 2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(CacheCorrupt, match="s.safetensors"):
        ShardReader(str(path)).rows(1)
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(CacheCorrupt, match="not a readable cache shard"):
        ShardReader(str(path))


def test_key_manifest_and_active_pointer(tmp_path):
    assert cache_key(FIELDS) != cache_key({**FIELDS, "num_prompts": 3})
    folder = CacheFolder(tmp_path, FIELDS).ensure()
    assert json.loads((tmp_path / folder.key / "manifest.json").read_text()) == FIELDS
    with pytest.raises(StageInputError, match="run `mpe cache` first"):
        open_active(tmp_path, FIELDS)
    folder.write_active()
    assert open_active(tmp_path, {**FIELDS, "compute_dtype": "bfloat16"}).key == folder.key  # the stage's choice
    with pytest.raises(StageInputError, match="no cache for this configuration"):
        open_active(tmp_path, {**FIELDS, "num_prompts": 5})
    pointer = next((tmp_path / "active").glob("*.json"))  # a pointer edited by hand to another folder
    pointer.write_text(json.dumps({"key": "x", "fields": {**FIELDS, "num_prompts": 5}}))
    with pytest.raises(StageInputError, match="differs in: num_prompts"):
        open_active(tmp_path, FIELDS)
    forged = CacheFolder(tmp_path, {**FIELDS, "dtype": "bfloat16"})
    (tmp_path / forged.key).mkdir()
    (tmp_path / forged.key / "manifest.json").write_text(json.dumps(FIELDS))
    with pytest.raises(CacheMismatch, match="differs in: dtype"):
        forged.ensure()


def test_float16_overflow_is_refused():
    with pytest.raises(CacheOverflow, match="bfloat16"):
        encode(torch.full((2, 4), 1e6), STORAGE["float16"])
    stored, scale = encode(torch.full((2, 4), 1e6), STORAGE["float8_e4m3_row"])
    assert torch.isfinite(stored.float()).all() and torch.allclose(
        stored.float() * scale[:, None], torch.full((2, 4), 1e6)
    )
