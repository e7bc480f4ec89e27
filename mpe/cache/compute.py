"""Computing the cache: the trunk-only text tower, the key fields of a base model, and building one cache
shard (a data shard's samples, or a list of evaluation texts) with memory bounded by a batch.

Unique captions are run through the trunk in batches of similar length (little padding) and each
caption's rows are written at its own place in the shard file, so the order of computation does not
matter and nothing but the current batch is held.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from mpe.cache.store import (
    STORAGE,
    CacheCorrupt,
    CacheFolder,
    ShardReader,
    ShardWriter,
    key_fields,
    open_active,
    text_digest,
)
from mpe.data.hard_negatives import GENERATOR_VERSION, hard_negatives
from mpe.data.tar_stream import captions as shard_captions
from mpe.files import storage
from mpe.files.hashing import checkpoint_sha256, fingerprint
from mpe.files.verified import Record, signature
from mpe.model.configuration import TextConfig
from mpe.model.text.lm_io import load_lm
from mpe.model.text.prompt_sequence import PromptLayout, build_batch, build_layout, tokenize_captions
from mpe.model.text.tower import LLMTextTower


def load_trunk_tower(
    base_dir: Path, text: TextConfig, trust_remote_code: bool = False, device: str = "cpu"
) -> LLMTextTower:
    """The LLM text tower on the prepared base model, without projections (only the trunk is used)."""
    lm, tok = load_lm(base_dir, text.attn_implementation, torch.float32, trust_remote_code)
    return LLMTextTower(lm, tok, text, None).to(device).eval()


@dataclass
class TrunkInfo:
    """What the cache needs to know of a base model without loading its weights."""

    tokenizer: object
    layout: PromptLayout
    hidden: int
    n_layers: int
    model_sha256: str


def trunk_info(base_dir: Path, text: TextConfig, trust_remote_code: bool = False) -> TrunkInfo:
    """Tokenizer, prompt layout, width and depth of the base model in ``base_dir`` (config and tokenizer
    only; the weights enter through their hash)."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    return TrunkInfo(
        tok, build_layout(tok, text), config.hidden_size, config.num_hidden_layers, checkpoint_sha256(base_dir)
    )


def cache_fields(
    base_dir: Path,
    text: TextConfig,
    storage_dtype: str,
    trust_remote_code: bool = False,
    compute_dtype: str = "float32",
    info: TrunkInfo | None = None,
) -> dict:
    """The cache key fields for ``text`` on the base model in ``base_dir``."""
    info = info or trunk_info(base_dir, text, trust_remote_code)
    return key_fields(info.model_sha256, info.layout, text, storage_dtype, info.n_layers, compute_dtype)


def open_cache(
    root: str | Path, base_dir: Path, text: TextConfig, storage_dtype: str, trust_remote_code: bool = False
) -> CacheFolder:
    """The cache the cache stage built for ``text`` on the base model in ``base_dir``: the one way its readers
    (train, evaluate, reweight) open it, keyed by exactly what the cache stage keyed it by."""
    return open_active(root, cache_fields(Path(base_dir), text, storage_dtype, trust_remote_code))


def trunk_rows(states: torch.Tensor, caption_lens: list[int], segments_len: int) -> list[torch.Tensor]:
    """Each caption's own rows (no left padding) of a padded ``(B, T, H)`` trunk output, as fp32 on CPU."""
    return [states[i, -(c + segments_len) :].float().cpu() for i, c in enumerate(caption_lens)]


@torch.no_grad()
def trunk_states_of_ids(tower: LLMTextTower, ids: list[list[int]], autocast: torch.dtype | None) -> list[torch.Tensor]:
    """Per-caption trunk rows of already tokenized captions (one batch)."""
    batch = build_batch(ids, tower.layout, tower.pad_id).to(tower.device)
    with torch.autocast(batch.segment_ids.device.type, dtype=autocast, enabled=autocast is not None):
        h = tower.trunk(batch)
    return trunk_rows(h, [len(i) for i in ids], tower.layout.segments_len)


def data_shard_identity(data_url: str) -> dict[str, str]:
    """What a cache shard was built from: the data shard's name and size, and the sha256 of the
    img2dataset parquet beside it (keys, captions and statuses of every row), when there is one."""
    parquet = data_url.rsplit(".", 1)[0] + ".parquet"
    index = storage.sha256(parquet) if storage.exists(parquet) else ""
    return {"data_shard": storage.name(data_url), "data_size": str(storage.size(data_url)), "data_index_sha256": index}


TEXTS_IDENTITY = {"data_shard": "", "data_size": "0", "data_index_sha256": ""}  # a shard of evaluation texts


class ShardCheck:
    """The state of cache shards against the data they were built from, one folder's verification record
    at a time: ``check`` says ``current``, ``missing``, ``stale`` (built from other data) or ``damaged``
    (unreadable, or bytes that fail their checksums). A shard's states are read in full only when the
    file changed since it was last verified (:mod:`mpe.files.verified`); call ``save`` at the end."""

    def __init__(self):
        self.records: dict[str, Record] = {}
        self.damage: dict[str, str] = {}  # url -> the error that names the damage

    def _record(self, url: str) -> Record:
        folder = storage.parent(url)
        if folder not in self.records:
            self.records[folder] = Record(folder)
        return self.records[folder]

    def check(self, cache_url: str, identity: dict[str, str]) -> str:
        if not storage.exists(cache_url):
            return "missing"
        record = self._record(cache_url)
        try:
            before = signature(cache_url)
            with ShardReader(cache_url) as r:
                if not all(r.metadata.get(k) == v for k, v in identity.items()):
                    return "stale"
                if not record.holds(cache_url, r.digest):
                    r.verify()
                    record.add(cache_url, r.digest, before)
        except CacheCorrupt as err:
            record.drop(cache_url)
            self.damage[cache_url] = str(err)
            return "damaged"
        return "current"

    def written(self, cache_url: str) -> None:
        """Record a shard this process has just written as verified."""
        before = signature(cache_url)
        with ShardReader(cache_url) as r:
            self._record(cache_url).add(cache_url, r.digest, before)

    def save(self) -> None:
        for record in self.records.values():
            record.save()


@dataclass
class ShardTexts:
    """A shard's samples reduced to unique texts: ``keys[i]`` has text ``texts[sample_text[i]]``."""

    keys: list[str]
    texts: list[str]
    sample_text: list[int]

    @classmethod
    def from_pairs(cls, pairs) -> ShardTexts:
        keys, texts, sample_text, index = [], [], [], {}
        for key, text in pairs:
            if text not in index:
                index[text] = len(texts)
                texts.append(text)
            keys.append(key)
            sample_text.append(index[text])
        return cls(keys, texts, sample_text)


@torch.no_grad()
def write_shard(
    tower: LLMTextTower,
    out_url: str,
    shard: ShardTexts,
    storage_dtype: str,
    metadata: dict,
    batch_size: int = 32,
    autocast: torch.dtype | None = None,
    progress=None,
) -> dict:
    """Compute and write one cache shard atomically; returns its counts."""
    ids = tokenize_captions(tower.tokenizer, shard.texts, tower.cfg.max_caption_tokens)
    lens = [len(i) for i in ids]
    seg = tower.layout.segments_len
    meta = {**metadata, "keys": _json(shard.keys)}
    order = sorted(range(len(ids)), key=lambda u: lens[u])  # similar lengths together: little padding
    with storage.atomic_local_copy(out_url, ".safetensors") as tmp:
        writer = ShardWriter(
            tmp,
            STORAGE[storage_dtype],
            tower.decoder.hidden_size,
            lens,
            seg,
            [text_digest(t) for t in shard.texts],
            shard.sample_text,
            meta,
        )
        try:
            for b0 in range(0, len(order), batch_size):
                us = order[b0 : b0 + batch_size]
                for u, rows in zip(us, trunk_states_of_ids(tower, [ids[u] for u in us], autocast)):
                    writer.write_caption(u, rows)
                if progress is not None:
                    progress(len(us))
        except BaseException:
            writer.abort()
            raise
        writer.close()
    return {"samples": len(shard.keys), "texts": len(shard.texts), "rows": writer.total_rows}


def _json(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def cache_data_shard(
    tower: LLMTextTower,
    data_url: str,
    out_url: str,
    storage_dtype: str,
    batch_size: int = 32,
    autocast: torch.dtype | None = None,
    progress=None,
) -> dict:
    """The cache shard of one data shard: every sample with a caption, in the shard's order."""
    identity = data_shard_identity(data_url)
    shard = ShardTexts.from_pairs(shard_captions(data_url))
    return write_shard(tower, out_url, shard, storage_dtype, identity, batch_size, autocast, progress)


def cache_texts(
    tower: LLMTextTower,
    texts: list[str],
    out_url: str,
    storage_dtype: str,
    batch_size: int = 32,
    autocast: torch.dtype | None = None,
    progress=None,
) -> dict:
    """A text shard: each unique text once, its sample key its sha256."""
    unique = list(dict.fromkeys(texts))
    shard = ShardTexts([text_digest(t).hex() for t in unique], unique, list(range(len(unique))))
    return write_shard(
        tower,
        out_url,
        shard,
        storage_dtype,
        TEXTS_IDENTITY,
        batch_size,
        autocast,
        progress,
    )


def negatives_identity(data_url: str, per_caption: int, seed: int) -> dict[str, str]:
    """What a negatives shard was built from: its data shard (as :func:`data_shard_identity`) and which
    negatives were drawn (how many per caption, the seed, the generator's version)."""
    drawn = fingerprint({"per_caption": per_caption, "seed": seed, "generator": GENERATOR_VERSION}, 16)
    return {**data_shard_identity(data_url), "negatives": drawn}


def shard_negative_texts(data_url: str, per_caption: int, seed: int) -> list[str]:
    """Every hard negative of the data shard's captions, each text once."""
    captions = dict.fromkeys(c for _, c in shard_captions(data_url))
    return list(dict.fromkeys(t for c in captions for t in hard_negatives(c, per_caption, seed)))


def cache_negatives_shard(
    tower: LLMTextTower,
    data_url: str,
    out_url: str,
    per_caption: int,
    seed: int,
    storage_dtype: str,
    batch_size: int = 32,
    autocast: torch.dtype | None = None,
    progress=None,
) -> dict:
    """The negatives shard of one data shard: the trunk states of its captions' hard negatives, each text once,
    looked up by its sha256 (a text shard), marked with :func:`negatives_identity`."""
    texts = shard_negative_texts(data_url, per_caption, seed)
    shard = ShardTexts([text_digest(t).hex() for t in texts], texts, list(range(len(texts))))
    identity = negatives_identity(data_url, per_caption, seed)
    return write_shard(tower, out_url, shard, storage_dtype, identity, batch_size, autocast, progress)


def estimate_bytes(
    data_shards: list[str],
    extra_texts: int,
    info: TrunkInfo,
    max_caption_tokens: int,
    itemsize: int,
    sample: int = 1000,
    seed: int = 0,
    negatives_per_caption: int = 0,
) -> dict:
    """The disk the cache will take, before computing it: unique captions (per shard, from img2dataset's
    parquet files, else the shards' captions; with hard negatives, that many more texts per caption at
    most) × mean rows (from a tokenized sample) × hidden × bytes."""
    import pandas as pd

    unique, samples, pool = extra_texts, 0, []
    for url in data_shards:
        parquet = url.rsplit(".", 1)[0] + ".parquet"
        if storage.exists(parquet):
            with storage.open_read(parquet) as f:
                df = pd.read_parquet(f, columns=["caption", "status"])
            caps = df.loc[df["status"] == "success", "caption"].fillna("").astype(str).str.strip()
            caps = [c for c in caps if c]
        else:
            caps = [c for _, c in shard_captions(url)]
        samples += len(caps)
        uniq = list(dict.fromkeys(caps))
        unique += len(uniq) * (1 + negatives_per_caption)
        pool.extend(uniq[: max(1, sample // max(1, len(data_shards)))])
    picked = random.Random(seed).sample(pool, min(sample, len(pool))) if pool else []
    lens = [len(i) for i in tokenize_captions(info.tokenizer, picked, max_caption_tokens)] or [1]
    rows = sum(lens) / len(lens) + info.layout.segments_len
    return {
        "samples": samples,
        "unique_texts": unique,
        "mean_rows": rows,
        "hidden": info.hidden,
        "bytes_per_value": itemsize,
        "bytes": int(unique * rows * info.hidden * itemsize),
    }
