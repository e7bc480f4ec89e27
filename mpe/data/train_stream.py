"""The training data stream: images and their cached trunk states read together, shard by shard, in
loader worker processes, through a seeded shuffle buffer, with a position that a checkpoint records so
that a resumed run sees exactly the samples, in exactly the order, an uninterrupted run would.

Who reads what. Each Ray Train rank runs ``loader_workers`` loader processes; every (rank, worker)
pair is a *slot*. In epoch ``e`` the shard list is permuted with a seed of ``(seed, e)`` and slot ``s``
of ``S`` takes shards ``s, s+S, s+2S, …`` of it (with fewer shards than slots, every slot reads every
shard and keeps each ``S``-th sample). A slot streams its shards one after another, each data shard in
lockstep with its cache shard (same keys, same order, checked), into a shuffle buffer of
``shuffle_buffer`` samples drawn from with the slot's own seeded generator; at the end of its pass the
buffer is emptied and the next epoch begins. Sampling is without replacement within a pass.

Exact resume. A slot's state is its epoch, the shard position and sample offset it has read up to,
the ``(position, offset)`` of every sample in its buffer, and its generator's state: a few KB. Each
batch carries the state of its slot after producing it; the trainer keeps the state of the last batch
it consumed from each slot. Batches come from a rank's workers in turn (torch's ``DataLoader``), so
after ``step`` batches the next comes from worker ``step mod W``: on resume, the workers are renumbered
to start there, each continues from its state, and the buffer is refilled by re-reading the few shards
its samples came from. Decoding (PIL) happens in the worker, which sends ``uint8`` pixels and the
states in their storage dtype.

Hard negatives. With ``hard_negatives`` > 0 every sample brings that many negative captions of its own
caption (``mpe.data.hard_negatives``, a function of the caption and ``negatives_seed``, so a resumed run
makes the same ones); a caption with fewer pads with itself (the loss leaves those out). With the cache
their trunk states come from the negatives shard beside the data shard's cache shard.
"""

from __future__ import annotations

import io
import random
from collections import Counter
from dataclasses import dataclass, field

import torch
from PIL import Image, UnidentifiedImageError

from mpe.cache.store import ShardReader, decode, left_pad, text_digest
from mpe.data.hard_negatives import hard_negatives, text_id
from mpe.data.tar_stream import caption_of, image_of, iter_samples
from mpe.errors import DataError
from mpe.model.vision.preprocess import ImageTransform


@dataclass(frozen=True)
class StreamSpec:
    """Everything a loader worker needs (picklable)."""

    data_shards: tuple[str, ...]
    cache_shards: tuple[str, ...] | None  # aligned with data_shards; None trains from captions
    batch_size: int
    image_size: int
    shuffle_buffer: int
    seed: int
    rank: int = 0
    world: int = 1
    workers: int = 1  # loader processes per rank (0: read in the training process)
    image_transform: dict | None = None  # ImageTransform.to_json() of the tower; None: mpe's own at image_size
    hard_negatives: int = 0  # negative captions per sample (0: none)
    negatives_seed: int = 0
    negative_shards: tuple[str, ...] | None = None  # aligned with data_shards: their negatives' cached states

    def transform(self) -> ImageTransform:
        if self.image_transform is None:
            return ImageTransform.own(self.image_size)
        return ImageTransform.from_json(self.image_transform)


@dataclass
class Raw:
    """A sample as read, not yet decoded."""

    key: str
    image: bytes | None
    caption: str
    states: torch.Tensor | None = None  # storage dtype
    scales: torch.Tensor | None = None
    caption_len: int = 0
    negatives: list[str] = field(default_factory=list)
    negative_rows: list[tuple[torch.Tensor, torch.Tensor | None, int]] = field(default_factory=list)


class NegativeStates:
    """The cached states of one data shard's hard negatives, looked up by text."""

    def __init__(self, url: str):
        self.reader = ShardReader(url)
        self.index = {bytes(self.reader.text_sha256[u].tolist()): u for u in range(self.reader.num_texts)}

    def rows(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        u = self.index.get(text_digest(text))
        if u is None:
            raise DataError(f"negatives shard {self.reader.url} lacks the negative {text[:60]!r}: rerun `mpe cache`")
        return (*self.reader.stored_rows(u), int(self.reader.caption_lens[u]))

    def close(self) -> None:
        self.reader.close()


@dataclass
class SlotState:
    epoch: int = 0
    pos: int = 0  # index into this epoch's shard list of the slot
    offset: int = 0  # next sample offset to read in that shard
    buffer: list = field(default_factory=list)  # [[pos, offset], …] of the buffered samples, in order
    rng: list | None = None

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "offset": self.offset, "buffer": self.buffer, "rng": self.rng}


def _rng_to_json(rng: random.Random) -> list:
    v, internal, gauss = rng.getstate()
    return [v, list(internal), gauss]


def _rng_from_json(state: list) -> random.Random:
    rng = random.Random()
    rng.setstate((state[0], tuple(state[1]), state[2]))
    return rng


class SlotStream:
    """One slot's endless stream of batches (see the module docstring)."""

    def __init__(self, spec: StreamSpec, slot: int, n_slots: int, state: dict | None = None):
        self.spec, self.slot, self.n_slots = spec, slot, n_slots
        self.by_sample = len(spec.data_shards) < n_slots
        self.skipped: Counter = Counter()
        st = SlotState(**state) if state else SlotState()
        self.epoch, self.pos, self.offset = st.epoch, st.pos, st.offset
        self.rng = _rng_from_json(st.rng) if st.rng else random.Random(spec.seed * 1_000_003 + slot)
        self.buffer: list[tuple[tuple[int, int], Raw]] = self._refill(st.buffer) if st.buffer else []
        self.reader = None  # the live (offset, Raw) iterator of the shard at self.pos
        self.read_this_epoch = bool(st.pos or st.offset or st.buffer)

    # -- which shards ---------------------------------------------------------------------------
    def epoch_shards(self, epoch: int) -> list[int]:
        order = list(range(len(self.spec.data_shards)))
        random.Random(self.spec.seed * 7919 + epoch).shuffle(order)  # the same on every slot
        return order if self.by_sample else order[self.slot :: self.n_slots]

    def _read(self, shard: int, start: int = 0, only: set[int] | None = None):
        """``(offset, Raw)`` of this slot's samples of ``shard`` from ``start`` (or just those in ``only``)."""
        spec = self.spec
        data_url = spec.data_shards[shard]
        cache = ShardReader(spec.cache_shards[shard]) if spec.cache_shards else None
        negatives = (
            NegativeStates(spec.negative_shards[shard]) if spec.hard_negatives and spec.negative_shards else None
        )
        try:
            entry = 0
            for offset, (key, files) in enumerate(iter_samples(data_url)):
                caption = caption_of(files)
                mine = not self.by_sample or offset % self.n_slots == self.slot
                wanted = offset in only if only is not None else offset >= start
                if not caption:
                    if wanted and mine and only is None:
                        self.skipped["empty_caption"] += 1
                    continue
                e = entry
                entry += 1
                if cache is not None and (e >= len(cache) or cache.keys[e] != key):
                    raise DataError(
                        f"cache shard {cache.url} does not match data shard {data_url} at sample "
                        f"{key}: rerun `mpe cache`"
                    )
                if not (wanted and mine):
                    continue
                raw = Raw(key, image_of(files), caption)
                if cache is not None:
                    u = int(cache.sample_text[e])
                    if bytes(cache.text_sha256[u].tolist()) != text_digest(caption):
                        raise DataError(
                            f"cache shard {cache.url} holds another caption for sample {key} of "
                            f"{data_url}: rerun `mpe cache`"
                        )
                    raw.states, raw.scales = cache.stored_rows(u)
                    raw.caption_len = int(cache.caption_lens[u])
                if spec.hard_negatives:
                    negs = hard_negatives(caption, spec.hard_negatives, spec.negatives_seed)
                    raw.negatives = negs + [caption] * (spec.hard_negatives - len(negs))  # padding: masked out
                    if negatives is not None:
                        raw.negative_rows = [
                            negatives.rows(t) if t != caption else (raw.states, raw.scales, raw.caption_len)
                            for t in raw.negatives
                        ]
                yield offset, raw
        finally:
            if cache is not None:
                cache.close()
            if negatives is not None:
                negatives.close()

    def _refill(self, entries: list) -> list:
        """The buffer of a saved state: its samples re-read from the shards they came from."""
        shards = self.epoch_shards(self.epoch)
        found = {}
        for pos in sorted({p for p, _ in entries}):
            wanted = {o for p, o in entries if p == pos}
            for off, raw in self._read(shards[pos], only=wanted):
                found[(pos, off)] = raw
        missing = [e for e in entries if tuple(e) not in found]
        if missing:
            raise DataError(f"resume: samples {missing[:3]} of the saved shuffle buffer are no longer in the data")
        return [((p, o), found[(p, o)]) for p, o in entries]

    # -- the stream ------------------------------------------------------------------------------
    def _next_raw(self) -> Raw:
        buf_size = max(1, self.spec.shuffle_buffer)
        while True:
            shards = self.epoch_shards(self.epoch)
            while self.pos < len(shards) and len(self.buffer) < buf_size:
                if self.reader is None:
                    self.reader = self._read(shards[self.pos], start=self.offset)
                item = next(self.reader, None)
                if item is None:
                    self.reader, self.pos, self.offset = None, self.pos + 1, 0
                    continue
                off, raw = item
                self.offset = off + 1
                self.read_this_epoch = True
                self.buffer.append(((self.pos, off), raw))
            if self.buffer:
                i = self.rng.randrange(len(self.buffer))
                self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
                return self.buffer.pop()[1]
            if not self.read_this_epoch:
                raise DataError(
                    f"slot {self.slot}: no usable samples in its {len(shards)} shards ({dict(self.skipped)} skipped)"
                )
            self.epoch, self.pos, self.offset, self.read_this_epoch = self.epoch + 1, 0, 0, False

    def state(self) -> dict:
        return SlotState(
            self.epoch, self.pos, self.offset, [list(p) for p, _ in self.buffer], _rng_to_json(self.rng)
        ).to_json()

    def next_batch(self) -> dict:
        """A collated batch and this slot's state after it."""
        transform = self.spec.transform()
        pixels, keys, captions, states, lens = [], [], [], [], []
        negatives, negative_states, negative_lens = [], [], []
        while len(keys) < self.spec.batch_size:
            raw = self._next_raw()
            try:
                if raw.image is None:
                    raise ValueError("no image")
                with Image.open(io.BytesIO(raw.image)) as im:
                    im.load()
                    pixels.append(transform.to_uint8(im))
            except (UnidentifiedImageError, OSError, ValueError):
                self.skipped["bad_image"] += 1
                continue
            keys.append(raw.key)
            captions.append(raw.caption)
            if raw.states is not None:
                rows = raw.states if raw.scales is None else decode(raw.states, raw.scales)
                states.append(rows)
                lens.append(raw.caption_len)
            negatives += raw.negatives
            for stored, scales, n in raw.negative_rows:
                negative_states.append(stored if scales is None else decode(stored, scales))
                negative_lens.append(n)
        batch = {
            "pixels": torch.stack(pixels),
            "keys": keys,
            "captions": captions,
            "state": self.state(),
            "skipped": dict(self.skipped),
        }
        if states:
            batch["states"] = left_pad(states)
            batch["caption_lens"] = torch.tensor(lens)
        if self.spec.hard_negatives:
            batch["negatives"] = negatives
            batch["caption_ids"] = torch.tensor([text_id(c) for c in captions], dtype=torch.int64)
            batch["negative_ids"] = torch.tensor([text_id(t) for t in negatives], dtype=torch.int64)
            if negative_states:
                batch["negative_states"] = left_pad(negative_states)
                batch["negative_lens"] = torch.tensor(negative_lens)
        return batch


class ShardStreamDataset(torch.utils.data.IterableDataset):
    """The per-rank dataset a ``DataLoader`` runs in its workers: each worker is one slot."""

    def __init__(self, spec: StreamSpec, resume: dict[str, dict], first_worker: int):
        self.spec, self.resume, self.first_worker = spec, resume, first_worker

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        n = max(1, self.spec.workers)
        physical = info.id if info is not None else 0
        logical = (physical + self.first_worker) % n
        if info is not None:
            torch.set_num_threads(1)  # per-sample tensor work is many times slower with the default
        stream = SlotStream(self.spec, self.spec.rank * n + logical, self.spec.world * n, self.resume.get(str(logical)))
        while True:
            batch = stream.next_batch()
            batch["worker"] = logical
            yield batch


class TrainLoader:
    """The rank's batches, read ahead by ``spec.workers`` processes; ``state()`` is what a checkpoint keeps."""

    def __init__(self, spec: StreamSpec, resume: dict | None = None, step: int = 0, prefetch: int = 2):
        n = max(1, spec.workers)
        self.states: dict[str, dict] = dict(resume or {})
        dataset = ShardStreamDataset(spec, dict(self.states), step % n)
        kwargs = {"num_workers": spec.workers, "batch_size": None}
        if spec.workers:
            kwargs.update(prefetch_factor=prefetch, multiprocessing_context="fork")
        self.loader = torch.utils.data.DataLoader(dataset, **kwargs)
        self.it = iter(self.loader)
        self.skipped: dict[str, dict] = {}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.it)
        worker = str(batch.pop("worker"))
        self.states[worker] = batch.pop("state")
        self.skipped[worker] = batch.pop("skipped")
        return batch

    def state(self) -> dict:
        return {k: v for k, v in self.states.items()}

    def skipped_total(self) -> dict:
        total: Counter = Counter()
        for counts in self.skipped.values():
            total.update(counts)
        return dict(total)

    def close(self) -> None:
        del self.it
