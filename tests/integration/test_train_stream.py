"""The training stream for real: tar shards and their cache shards read in lockstep by loader worker
processes, a seeded shuffle buffer, and a resume that continues the exact key sequence."""

from collections import Counter
from pathlib import Path

import pytest
import torch

from mpe.cache.compute import cache_data_shard, load_trunk_tower
from mpe.cache.store import ShardReader
from mpe.data.train_stream import SlotStream, StreamSpec, TrainLoader
from mpe.errors import DataError
from tests.synthetic_corpus import write_corpus


@pytest.fixture(scope="module")
def corpus(project, tmp_path_factory):
    _, params = project
    root = tmp_path_factory.mktemp("stream")
    shards = write_corpus(
        root / "shards", 150, 40, image_size=32, empty_caption_every=17, corrupt_image_every=23, captions_repeat=2
    )
    tower = load_trunk_tower(Path(params.base_model.out_dir), params.model.text)
    caches = []
    for d in shards:
        out = root / "cache" / f"{d.stem}.safetensors"
        cache_data_shard(tower, str(d), str(out), "float16", batch_size=8)
        caches.append(str(out))
    return tuple(map(str, shards)), tuple(caches), tower


def _spec(corpus, **kw):
    data, cache, _ = corpus
    base = dict(
        data_shards=data,
        cache_shards=cache,
        batch_size=8,
        image_size=32,
        shuffle_buffer=24,
        seed=3,
        rank=0,
        world=1,
        workers=2,
    )
    return StreamSpec(**{**base, **kw})


def _keys(loader, n):
    return [next(loader)["keys"] for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_exact_key_sequence(corpus, workers):
    spec = _spec(corpus, workers=workers)
    whole = TrainLoader(spec)
    expected = _keys(whole, 30)  # 240 samples: past the end of the first pass of each slot
    whole.close()
    first = TrainLoader(spec)
    got = _keys(first, 13)
    state = first.state()
    first.close()
    resumed = TrainLoader(spec, resume=state, step=13)
    got += _keys(resumed, 17)
    resumed.close()
    assert got == expected


def test_each_slot_reads_its_samples_once_per_pass(corpus):
    data, cache, _ = corpus
    expect = {k for url in cache for k in ShardReader(url).keys}  # every sample with a caption
    for n_slots in (2, 7):  # by shard (4 shards, 2 slots) and by sample (7 slots > 4 shards)
        seen = Counter()
        for slot in range(n_slots):
            stream = SlotStream(_spec(corpus), slot, n_slots)
            mine = []
            while True:
                raw = stream._next_raw()
                if stream.epoch > 0:  # the first sample of the next pass
                    break
                mine.append(raw.key)
            seen.update(mine)
        assert set(seen) == expect and set(seen.values()) == {1}, n_slots


def test_batches_carry_the_cached_states_of_their_captions(corpus):
    _, cache, tower = corpus
    readers = [ShardReader(u) for u in cache]
    by_key = {k: (r, int(r.sample_text[i])) for r in readers for i, k in enumerate(r.keys)}
    loader = TrainLoader(_spec(corpus, workers=0))
    batch = next(loader)
    loader.close()
    assert batch["pixels"].dtype == torch.uint8 and batch["pixels"].shape == (8, 3, 32, 32)
    fresh = tower.trunk(tower.tokenize(batch["captions"]))  # an independent pass over the same captions
    seg = tower.layout.segments_len
    for i, key in enumerate(batch["keys"]):
        reader, u = by_key[key]
        c = int(batch["caption_lens"][i])
        rows = batch["states"][i, -(c + seg) :].float()
        assert torch.equal(rows, reader.rows(u))
        assert torch.allclose(rows, fresh[i, -(c + seg) :].float(), rtol=2e-3, atol=2e-3)
        assert (batch["states"][i, : -(c + seg)] == 0).all()


def test_skipped_samples_are_counted(corpus):
    loader = TrainLoader(_spec(corpus, workers=0, shuffle_buffer=1))
    for _ in range(19):  # 150 samples: 8 empty captions, ~6 corrupt images
        next(loader)
    skipped = loader.skipped_total()
    assert skipped["empty_caption"] >= 8 and skipped["bad_image"] >= 5


def test_a_cache_shard_of_another_data_shard_is_refused(corpus):
    data, cache, _ = corpus
    loader = TrainLoader(_spec(corpus, cache_shards=tuple(reversed(cache)), workers=0))
    with pytest.raises(DataError, match="does not match data shard"):
        next(loader)


def test_shards_read_through_file_urls_give_the_same_batches(corpus):
    data, cache, _ = corpus
    as_url = lambda paths: tuple(Path(p).as_uri() for p in paths)  # noqa: E731
    local = TrainLoader(_spec(corpus, workers=0))
    remote = TrainLoader(_spec(corpus, data_shards=as_url(data), cache_shards=as_url(cache), workers=0))
    for _ in range(3):
        a, b = next(local), next(remote)
        assert (
            a["keys"] == b["keys"] and torch.equal(a["states"], b["states"]) and torch.equal(a["pixels"], b["pixels"])
        )


@pytest.fixture(scope="module")
def negative_shards(corpus, tmp_path_factory):
    from mpe.cache.compute import cache_negatives_shard

    data, _, tower = corpus
    root = tmp_path_factory.mktemp("negatives")
    out = []
    for d in data:
        target = root / f"{Path(d).stem}.safetensors"
        cache_negatives_shard(tower, d, str(target), 2, 0, "float16", batch_size=8)
        out.append(str(target))
    return tuple(out)


def test_hard_negatives_come_with_their_cached_states_and_ids(corpus, negative_shards):
    """Every sample brings its caption's two negatives (padded with the caption itself when fewer exist), their
    states read from the negatives shard by text, and the ids the loss compares."""
    from mpe.cache.store import text_digest
    from mpe.data.hard_negatives import hard_negatives, text_id

    spec = _spec(corpus, workers=0, hard_negatives=2, negative_shards=negative_shards)
    loader = TrainLoader(spec)
    batch = next(loader)
    loader.close()
    n = len(batch["captions"])
    assert len(batch["negatives"]) == 2 * n and batch["negative_states"].shape[0] == 2 * n
    rows, lens = {}, {}
    for url in negative_shards:
        r = ShardReader(url)
        rows.update({bytes(r.text_sha256[u].tolist()): r.rows(u) for u in range(r.num_texts)})
        lens.update({bytes(r.text_sha256[u].tolist()): int(r.caption_lens[u]) for u in range(r.num_texts)})
    for i, caption in enumerate(batch["captions"]):
        negs = hard_negatives(caption, 2, 0)
        assert negs, caption  # the synthetic captions have colour and size words
        assert batch["negatives"][2 * i : 2 * i + 2] == negs + [caption] * (2 - len(negs))
        for j, text in enumerate(negs):
            stored = rows[text_digest(text)]
            got = batch["negative_states"][2 * i + j]
            got = got[got.shape[0] - stored.shape[0] :]  # left padded
            assert torch.equal(got.float(), stored.float())
            assert batch["negative_lens"][2 * i + j] == lens[text_digest(text)]
    assert batch["caption_ids"].tolist() == [text_id(c) for c in batch["captions"]]
    assert batch["negative_ids"].tolist() == [text_id(t) for t in batch["negatives"]]
