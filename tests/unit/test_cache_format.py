"""The cache shard format on its own: exact round trips in each storage dtype (read back by our reader
and by safetensors' own), out-of-order writes, the key and manifest rules, corrupt files named, bytes
changed after writing caught by the checksums."""

import json
import struct

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
from mpe.files.verified import RECORD, Record, signature

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
        assert f.metadata()["format"] == "3"
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


def _offsets(path) -> tuple[int, dict]:
    """Where the data starts in a safetensors file, and its header (read as safetensors defines it)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return 8 + n, json.loads(raw[8 : 8 + n])


def _flip(path, at: int) -> None:
    """One byte changed in place: the file keeps its size."""
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x5A]))


@pytest.mark.parametrize("dtype", ["float16", "float8_e4m3_tensor"])
def test_a_byte_changed_in_the_states_is_named_when_its_caption_is_read(tmp_path, dtype):
    path = tmp_path / "s.safetensors"
    _write(path, dtype, [torch.randn(3, 4), torch.randn(4, 4), torch.randn(5, 4)], [1, 2, 3], 2)
    start, header = _offsets(path)
    caption_1 = start + header["states"]["data_offsets"][0] + 3 * 4 * STORAGE[dtype].itemsize  # its first row
    _flip(path, caption_1 + 1)
    with ShardReader(str(path)) as r:  # the index is intact: the shard opens
        r.rows(0), r.rows(2)  # the other captions read as written
        with pytest.raises(CacheCorrupt, match=r"s.safetensors: the states of caption 1 .*`mpe cache` recomputes it"):
            r.rows(1)
        with pytest.raises(CacheCorrupt, match="caption 1"):
            r.verify()


def test_a_byte_changed_in_the_index_or_the_header_is_named_on_open(tmp_path):
    path = tmp_path / "s.safetensors"
    _write(path, "float16", [torch.ones(3, 4), torch.ones(4, 4)], [1, 2], 2)
    original = path.read_bytes()
    start, header = _offsets(path)
    _flip(path, start + header["sample_text"]["data_offsets"][0])  # which caption a sample has
    with pytest.raises(CacheCorrupt, match="its header or index does not match its checksum"):
        ShardReader(str(path))
    assert original.count(b"k1") == 1
    path.write_bytes(original.replace(b"k1", b"k9"))  # another sample key, the JSON still valid
    with pytest.raises(CacheCorrupt, match="its header or index does not match its checksum"):
        ShardReader(str(path))
    path.write_bytes(original)
    ShardReader(str(path)).verify()


def test_damage_found_while_reading_drops_the_shard_from_its_folder_s_verification_record(tmp_path):
    path = tmp_path / "s.safetensors"
    _write(path, "float16", [torch.ones(3, 4), torch.ones(4, 4)], [1, 2], 2)
    record = Record(str(tmp_path))
    with ShardReader(str(path)) as r:
        record.add(str(path), r.digest, signature(str(path)))
    record.save()
    start, header = _offsets(path)
    _flip(path, start + header["states"]["data_offsets"][0])
    assert str(path.name) in json.loads((tmp_path / RECORD).read_text())
    with pytest.raises(CacheCorrupt), ShardReader(str(path)) as r:
        r.rows(0)
    assert json.loads((tmp_path / RECORD).read_text()) == {}  # the next check reads the file again


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
