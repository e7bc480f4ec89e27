"""The hidden-state cache: the frozen trunk's output for the pipeline's texts, in shards aligned with the
data shards, so that training streams images and their states together and nothing ever holds an
index of the whole corpus.

Layout of ``<root>/<key>/`` (``<root>`` is a local folder or any fsspec URL)::

    manifest.json                    the key's fields: everything that changes the stored states
    train/<shard>.safetensors        one cache shard per data shard, its samples in the shard's order
    texts/<fingerprint>.safetensors  evaluation texts that are not training samples (test captions,
                                     negation queries, zero-shot prompts), looked up by their sha256
    negatives/<shard>.safetensors    with ``train.hard_negatives``: the hard-negative captions of a data
                                     shard's captions, looked up by their sha256 (their shard's identity
                                     adds which negatives were drawn; the key does not change)

and ``<root>/active/<config>.json``: for each configuration (the fields but the compute precision, which
is the cache stage's choice), the key the last cache stage wrote, which training and evaluation read. A
cache shard is a plain safetensors file (readable by ``safetensors.safe_open``)::

    states       (R, H)    storage dtype; the rows of each unique caption back to back
    row_scales   (R,)/(1,) float32 scales of a float8 ``states`` (per row / per tensor); absent otherwise
    row_offsets  (U+1,)    int64: unique caption u owns rows [row_offsets[u], row_offsets[u+1])
    caption_lens (U,)      int32: caption tokens of u (its remaining rows are the prompt segments)
    text_sha256  (U, 32)   uint8: sha256 of caption u's text
    sample_text  (N,)      int32: the unique caption of each sample, in the data shard's order
    rows_crc32   (U,)      int64: CRC-32 of caption u's stored rows, as bytes
    metadata: ``keys`` (JSON list of the N sample keys), ``data_shard``, ``data_size``,
    ``data_index_sha256`` (what the shard was built from), ``format``, ``index_crc32`` (CRC-32 of the
    header, with this value written as ``00000000``, and of every tensor but ``states``)

Shards are written streaming (the header first, sizes known from the tokenized captions, then the
states batch by batch), to a temporary name renamed into place: a killed run leaves whole shards
only, and the next run computes just the shards that are missing or stale.

Damage after writing (a disk error, a stray write) is caught by the checksums, never trained on: opening a
shard checks the header and index (which it reads anyway), and every read of a caption's rows checks
them (CRC-32 runs at about 1 GB/s on one core, over bytes the loader reads anyway: no extra I/O).
:meth:`ShardReader.verify` reads every caption once, for the cache stage and a training's start.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from mpe.errors import CacheMismatch, MpeError, StageInputError
from mpe.files import storage, verified
from mpe.files.hashing import fingerprint
from mpe.model.configuration import TextConfig
from mpe.model.text.prompt_sequence import PromptLayout

FORMAT_VERSION = 3
ACTIVE_DIR = "active"
SHA_BYTES = 32
_CRC_FIELD = b'"index_crc32":"'
_CRC_BLANK = b"00000000"


@dataclass(frozen=True)
class StorageDtype:
    """How states are stored: the element type, its safetensors name and size, and float8 scaling."""

    name: str
    torch: torch.dtype
    st: str
    itemsize: int
    scaling: str | None = None  # "row" | "tensor" for float8


STORAGE = {
    d.name: d
    for d in (
        StorageDtype("float32", torch.float32, "F32", 4),
        StorageDtype("float16", torch.float16, "F16", 2),
        StorageDtype("bfloat16", torch.bfloat16, "BF16", 2),
        StorageDtype("float8_e4m3_row", torch.float8_e4m3fn, "F8_E4M3", 1, "row"),
        StorageDtype("float8_e4m3_tensor", torch.float8_e4m3fn, "F8_E4M3", 1, "tensor"),
    )
}
_ST_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
}
_FP8_MAX = 448.0


class CacheOverflow(MpeError):
    """States do not fit the storage dtype."""


class CacheCorrupt(MpeError):
    """A cache file cannot be read back, or its bytes are not those written; the message names it."""


def _damaged(url: str, what: str) -> CacheCorrupt:
    return CacheCorrupt(f"{url}: {what}: the file changed after it was written; `mpe cache` recomputes it")


def key_fields(
    model_hash: str, layout: PromptLayout, text: TextConfig, storage_dtype: str, n_layers: int, compute_dtype: str
) -> dict:
    """Everything that changes the stored states; its hash names the cache folder."""
    return {
        "format": FORMAT_VERSION,
        "model_sha256": model_hash,
        "pooling": text.pooling,
        "num_prompts": text.num_prompts,
        "negation": text.negation,
        "prompt_template": text.prompt_template,
        "negated_template": text.negated_template,
        "fixed_prompt": text.fixed_prompt,
        "max_caption_tokens": text.max_caption_tokens,
        "n_top": text.n_top,
        "trunk_layers": n_layers - text.n_top,
        "segments": [list(s) for s in layout.segments],
        "dtype": storage_dtype,
        "compute_dtype": compute_dtype,
    }


def cache_key(fields: dict) -> str:
    return fingerprint(fields, 20)


def text_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


# -- encoding ------------------------------------------------------------------------------------
def encode(states: torch.Tensor, dtype: StorageDtype, scale: torch.Tensor | None = None):
    """fp32 ``(r, H)`` → ``(stored tensor, per-row scales or None)``; float16 overflow is refused."""
    if dtype.scaling == "row":
        scale = (states.abs().amax(1) / _FP8_MAX).clamp_min(1e-12)
        return (states / scale[:, None]).to(dtype.torch), scale.float()
    if dtype.scaling == "tensor":
        return (states / scale).to(dtype.torch), None
    out = states.to(dtype.torch)
    if dtype.torch == torch.float16 and not torch.isfinite(out).all():
        raise CacheOverflow("hidden states overflow float16; set cache.dtype: bfloat16 (or a float8 dtype)")
    return out, None


def decode(stored: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    out = stored.float()
    if scales is not None:
        out = out * (scales[:, None] if scales.numel() > 1 else scales)
    return out


# -- writing -------------------------------------------------------------------------------------
def tensor_specs(dtype: StorageDtype, hidden: int, rows: int, texts: int, samples: int) -> list[tuple]:
    """``(name, safetensors dtype, shape, bytes)`` of every tensor of a cache shard holding ``texts`` unique
    captions of ``rows`` rows in all for ``samples`` samples, in file order: what :class:`ShardWriter` writes
    and what the planner predicts (the JSON header, with the sample keys, comes on top)."""
    specs = [("states", dtype.st, [rows, hidden], rows * hidden * dtype.itemsize)]
    if dtype.scaling:
        n = rows if dtype.scaling == "row" else 1
        specs.append(("row_scales", "F32", [n], 4 * n))
    specs += [
        ("row_offsets", "I64", [texts + 1], 8 * (texts + 1)),
        ("caption_lens", "I32", [texts], 4 * texts),
        ("text_sha256", "U8", [texts, SHA_BYTES], SHA_BYTES * texts),
        ("sample_text", "I32", [samples], 4 * samples),
        ("rows_crc32", "I64", [texts], 8 * texts),  # a CRC-32 of each caption's stored rows
    ]
    return specs


def tensor_bytes(dtype: StorageDtype, hidden: int, rows: int, texts: int, samples: int, shards: int = 1) -> int:
    """Bytes of the tensors of ``shards`` cache shards holding ``rows``, ``texts`` and ``samples`` in all
    (every term is linear in them, but for one index entry and one float8 tensor scale per shard)."""
    one = sum(nbytes for *_, nbytes in tensor_specs(dtype, hidden, rows, texts, samples))
    per_shard = 8 + (4 if dtype.scaling == "tensor" else 0)  # row_offsets' leading 0; a tensor scale
    return one + (shards - 1) * per_shard


class ShardWriter:
    """Writes one cache shard to a local file: the header (sizes known from the caption lengths), each
    caption's rows at its own offset, in any order, then the index. Memory: one batch of rows."""

    def __init__(
        self,
        path: Path,
        dtype: StorageDtype,
        hidden: int,
        caption_lens: list[int],
        segments_len: int,
        text_shas: list[bytes],
        sample_text: list[int],
        metadata: dict[str, str],
    ):
        self.dtype, self.hidden = dtype, hidden
        rows = [c + segments_len for c in caption_lens]
        self.row_offsets = torch.tensor([0] + rows, dtype=torch.int64).cumsum(0)
        self.total_rows = int(self.row_offsets[-1])
        self.small = {
            "row_offsets": self.row_offsets,
            "caption_lens": torch.tensor(caption_lens, dtype=torch.int32),
            "text_sha256": torch.tensor(list(b"".join(text_shas)), dtype=torch.uint8).view(-1, SHA_BYTES),
            "sample_text": torch.tensor(sample_text, dtype=torch.int32),
        }
        self.rows_crc = [0] * len(caption_lens)
        specs = tensor_specs(dtype, hidden, self.total_rows, len(caption_lens), len(sample_text))
        header, offset = {}, 0
        for name, st, shape, nbytes in specs:
            header[name] = {"dtype": st, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        self.data_bytes = offset
        header["__metadata__"] = {**metadata, "format": str(FORMAT_VERSION), "index_crc32": _CRC_BLANK.decode()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.header_raw = raw
        self.crc_at = 8 + raw.index(_CRC_FIELD + _CRC_BLANK) + len(_CRC_FIELD)  # patched by close()
        self.data_start = 8 + len(raw)
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.done = torch.zeros(len(caption_lens), dtype=torch.bool)
        self.scales = torch.ones(self.total_rows) if dtype.scaling == "row" else None
        self.pending: dict[int, torch.Tensor] = {}
        self.closed = False

    def write_caption(self, u: int, rows: torch.Tensor) -> None:
        """Store caption ``u``'s fp32 ``(rows, H)`` states at its place."""
        r0, r1 = int(self.row_offsets[u]), int(self.row_offsets[u + 1])
        if tuple(rows.shape) != (r1 - r0, self.hidden):
            raise ValueError(f"caption {u}: rows of shape {tuple(rows.shape)}, expected {(r1 - r0, self.hidden)}")
        self.done[u] = True
        if self.dtype.scaling == "tensor":  # the scale needs every row: held until close (one shard at most)
            self.pending[u] = rows.float()
            return
        stored, scale = encode(rows.float(), self.dtype)
        if scale is not None:
            self.scales[r0:r1] = scale
        self._write_rows(u, stored)

    def _write_rows(self, u: int, stored: torch.Tensor) -> None:
        data = stored.contiguous().view(torch.uint8).numpy().tobytes()
        self.rows_crc[u] = zlib.crc32(data)
        self.f.seek(self.data_start + int(self.row_offsets[u]) * self.hidden * self.dtype.itemsize)
        self.f.write(data)

    def abort(self) -> None:
        self.closed = True
        self.f.close()

    def close(self) -> None:
        """Write the index and close; raises if a caption was never written (the file is then useless)."""
        if self.closed:
            return
        self.closed = True
        try:
            if not bool(self.done.all()):
                raise ValueError(f"{int((~self.done).sum())} captions were never written")
            tail = []
            if self.dtype.scaling == "tensor":
                amax = max((float(r.abs().amax()) for r in self.pending.values() if r.numel()), default=0.0)
                scale = torch.tensor(max(amax / _FP8_MAX, 1e-12))
                for u, rows in self.pending.items():
                    self._write_rows(u, encode(rows, self.dtype, scale)[0])
                tail.append(scale.reshape(1).float())
            elif self.scales is not None:
                tail.append(self.scales)
            tail += [*self.small.values(), torch.tensor(self.rows_crc, dtype=torch.int64)]
            index = b"".join(t.contiguous().numpy().tobytes() for t in tail)
            self.f.seek(self.data_start + self.total_rows * self.hidden * self.dtype.itemsize)
            self.f.write(index)
            if self.f.tell() != self.data_start + self.data_bytes:
                raise ValueError("cache shard size does not match its header")
            self.f.seek(self.crc_at)
            self.f.write(b"%08x" % zlib.crc32(index, zlib.crc32(self.header_raw)))
        finally:
            self.f.close()


# -- reading -------------------------------------------------------------------------------------
class ShardReader:
    """Random and sequential access to one cache shard; only the index is held in memory."""

    def __init__(self, url: str):
        self.url = url
        self.f = storage.open_read(url)
        try:
            n = struct.unpack("<Q", self.f.read(8))[0]
            if n > 1 << 30:
                raise ValueError("header length out of range")
            raw = self.f.read(n)
            self.header = json.loads(raw)
            self.data_start = 8 + n
            self.metadata = self.header.pop("__metadata__", {})
            if self.metadata.get("format") != str(FORMAT_VERSION):
                raise ValueError(f"cache format {self.metadata.get('format')}, not {FORMAT_VERSION}")
            small = self._index(raw)
            self.keys = json.loads(self.metadata["keys"])
        except CacheCorrupt:
            self.f.close()
            raise
        except (KeyError, ValueError, struct.error, RuntimeError) as err:
            self.f.close()
            raise CacheCorrupt(
                f"{url}: not a readable cache shard ({type(err).__name__}: {err}); `mpe cache` recomputes it"
            ) from None
        self.scales = small.get("row_scales")
        self.row_offsets, self.caption_lens = small["row_offsets"], small["caption_lens"]
        self.text_sha256, self.sample_text = small["text_sha256"], small["sample_text"]
        self.rows_crc32 = small["rows_crc32"].tolist()
        spec = self.header["states"]
        self.hidden = spec["shape"][1]
        self.dtype = _ST_DTYPES[spec["dtype"]]
        self.itemsize = torch.empty(0, dtype=self.dtype).element_size()
        self.states_begin = spec["data_offsets"][0]
        if len(self.keys) != len(self.sample_text):
            raise CacheCorrupt(f"{url}: {len(self.keys)} keys but {len(self.sample_text)} samples")

    def _index(self, raw_header: bytes) -> dict[str, torch.Tensor]:
        """Every tensor but ``states``, read in one piece and checked against ``index_crc32``."""
        value = self.metadata["index_crc32"].encode()
        blank = raw_header.replace(_CRC_FIELD + value + b'"', _CRC_FIELD + _CRC_BLANK + b'"', 1)
        begin = self.header["states"]["data_offsets"][1]
        end = max(spec["data_offsets"][1] for spec in self.header.values())
        index = self._read(begin, end - begin)
        if zlib.crc32(index, zlib.crc32(blank)) != int(value, 16):
            raise _damaged(self.url, "its header or index does not match its checksum")
        out = {}
        for name, spec in self.header.items():
            if name == "states":
                continue
            b, e = spec["data_offsets"]
            dtype = _ST_DTYPES[spec["dtype"]]
            chunk = index[b - begin : e - begin]
            t = torch.frombuffer(chunk, dtype=dtype) if chunk else torch.zeros(0, dtype=dtype)
            out[name] = t.reshape(spec["shape"])
        return out

    def _read(self, begin: int, nbytes: int) -> bytearray:
        self.f.seek(self.data_start + begin)
        data = bytearray(self.f.read(nbytes))
        if len(data) != nbytes:
            raise CacheCorrupt(
                f"{self.url}: truncated ({len(data)} of {nbytes} bytes at {begin}); `mpe cache` recomputes it"
            )
        return data

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_texts(self) -> int:
        return len(self.caption_lens)

    def stored_rows(self, u: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Caption ``u``'s rows as stored (storage dtype) and their scales: what a loader ships."""
        r0, r1 = int(self.row_offsets[u]), int(self.row_offsets[u + 1])
        size = self.itemsize * self.hidden
        raw = self._read(self.states_begin + r0 * size, (r1 - r0) * size)
        if zlib.crc32(raw) != self.rows_crc32[u]:
            verified.forget(self.url)  # bit rot leaves the file's stat as it was: the next check reads it all
            raise _damaged(self.url, f"the states of caption {u} do not match their checksum")
        stored = (
            torch.frombuffer(raw, dtype=self.dtype).view(r1 - r0, self.hidden)
            if raw
            else torch.zeros(0, self.hidden, dtype=self.dtype)
        )
        scales = None
        if self.scales is not None:
            scales = self.scales[r0:r1] if self.scales.numel() > 1 else self.scales
        return stored, scales

    def rows(self, u: int) -> torch.Tensor:
        """Caption ``u``'s states as fp32 ``(rows, H)``."""
        return decode(*self.stored_rows(u))

    def verify(self) -> None:
        """Read every caption's rows once, checking each against its checksum (:class:`CacheCorrupt` names
        the first that fails)."""
        for u in range(self.num_texts):
            self.stored_rows(u)

    @property
    def digest(self) -> str:
        """The shard's checksum of its index, which holds every caption's checksum: what a verification
        record keeps."""
        return self.metadata["index_crc32"]

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- the folder ----------------------------------------------------------------------------------
class CacheFolder:
    """``<root>/<key>/`` for one configuration."""

    def __init__(self, root: str | Path, fields: dict):
        self.root, self.fields = str(root), fields
        self.key = cache_key(fields)
        self.url = storage.join(root, self.key)
        self.dtype = STORAGE[fields["dtype"]]

    def ensure(self) -> CacheFolder:
        """Create the folder (manifest first) or check that an existing one was written for ``fields``."""
        manifest = storage.join(self.url, "manifest.json")
        if storage.exists(manifest):
            written = json.loads(storage.read_bytes(manifest))
            if written != self.fields:
                diff = sorted(k for k in set(written) | set(self.fields) if written.get(k) != self.fields.get(k))
                raise CacheMismatch(
                    f"{self.url} was written for another configuration (differs in: "
                    f"{', '.join(diff)}); use a fresh folder or the matching params"
                )
        else:
            with storage.atomic_local_copy(manifest, ".json") as tmp:
                tmp.write_text(json.dumps(self.fields, indent=1, sort_keys=True))
        return self

    def shard_url(self, split: str, data_shard: str) -> str:
        return storage.join(self.url, split, storage.name(data_shard).rsplit(".", 1)[0] + ".safetensors")

    def negatives_url(self, data_shard: str) -> str:
        """The shard of a training data shard's hard negatives (``mpe.cache.compute.cache_negatives_shard``)."""
        return self.shard_url("negatives", data_shard)

    def texts_url(self, texts: list[str]) -> str:
        return storage.join(self.url, "texts", fingerprint(sorted(set(texts)), 16) + ".safetensors")

    def write_active(self) -> None:
        with storage.atomic_local_copy(_pointer(self.root, self.fields), ".json") as tmp:
            tmp.write_text(json.dumps({"key": self.key, "fields": self.fields}, indent=1, sort_keys=True))


def _pointer(root: str | Path, fields: dict) -> str:
    config = {k: v for k, v in fields.items() if k != "compute_dtype"}
    return storage.join(root, ACTIVE_DIR, cache_key(config) + ".json")


def open_active(root: str | Path, expected: dict) -> CacheFolder:
    """The cache folder the last cache stage wrote for the configuration of ``expected`` (its fields but
    the compute precision, which is the cache stage's choice)."""
    pointer = _pointer(root, expected)
    if not storage.exists(pointer):
        raise StageInputError(f"{root}: no cache for this configuration yet; run `mpe cache` first")
    fields = json.loads(storage.read_bytes(pointer))["fields"]
    diff = sorted(k for k in set(fields) | set(expected) if k != "compute_dtype" and fields.get(k) != expected.get(k))
    if diff:
        raise StageInputError(
            f"{pointer} names a cache for another configuration (differs in: {', '.join(diff)}); "
            "run `mpe cache` with these params"
        )
    return CacheFolder(root, fields)


class TextStates:
    """Evaluation texts' states looked up by text (from the folder's ``texts/`` shards)."""

    def __init__(self, folder: CacheFolder):
        self.index: dict[bytes, tuple[ShardReader, int]] = {}
        for url in storage.list_files(storage.join(folder.url, "texts"), ".safetensors"):
            reader = ShardReader(url)
            for u in range(reader.num_texts):
                self.index[bytes(reader.text_sha256[u].tolist())] = (reader, u)

    def __contains__(self, text: str) -> bool:
        return text_digest(text) in self.index

    def __len__(self) -> int:
        return len(self.index)

    def get(self, text: str) -> tuple[torch.Tensor, int]:
        """``(rows, H)`` fp32 states and the caption length for ``text``."""
        try:
            reader, u = self.index[text_digest(text)]
        except KeyError:
            raise StageInputError(
                f"text not in the cache: {text[:80]!r}; the cache is older than the data: run `mpe cache`"
            ) from None
        return reader.rows(u), int(reader.caption_lens[u])

    def batch(self, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
        """Left-padded ``(B, T, H)`` fp32 states and caption lengths, ready for the top."""
        got = [self.get(t) for t in texts]
        return left_pad([g[0] for g in got]), [g[1] for g in got]


def left_pad(rows: list[torch.Tensor]) -> torch.Tensor:
    """``(B, T, H)`` from per-caption ``(r_i, H)``, zeros on the left."""
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_side="left")
