"""The video path on real files: mp4s written by the tests with PyAV, decoded and sampled; damaged files
counted and named; encode_video against encode_image; the temporal model saved and reloaded; the video
metrics and the MSR-VTT reader against one-item-at-a-time brute force; the moving-shapes world; a video row
served."""

import base64
import csv
import io
import random
import statistics

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mpe.config import ConfigError, DataConfig, MsrvttBenchmark, load_params
from mpe.data.video_codec import BadVideo, decode_clip, encode_mp4
from mpe.data.video_samples import load_video_split
from mpe.data.video_shapes import ClipScene, plan_video_splits, render_clip
from mpe.data.video_shards import VideoRecord, write_video_shards
from mpe.errors import DataError
from mpe.evaluation.benchmarks.msrvtt import read as read_msrvtt
from mpe.evaluation.benchmarks.scoring import score
from mpe.evaluation.video_metrics import TIE, video_retrieval_metrics
from mpe.evaluation.video_tasks import evaluate_videos
from mpe.model.multi_prompt_clip import MultiPromptCLIP
from mpe.model.vision.temporal import uniform_frame_indices
from mpe.serving.request import embed_rows
from tests.unit.test_model import tiny_model

GREYS = [16 * i + 8 for i in range(16)]  # frame i is a flat grey of level GREYS[i]


def grey_frames(levels, size=32):
    return [Image.new("RGB", (size, size), (g, g, g)) for g in levels]


def grey_level(frame: Image.Image) -> float:
    return float(np.asarray(frame, dtype=np.float32).mean())


def test_uniform_frame_indices_spread_over_the_clip_and_repeat_for_short_clips():
    assert uniform_frame_indices(16, 5) == [0, 3, 7, 11, 15]
    assert uniform_frame_indices(15, 8) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert uniform_frame_indices(3, 5) == [0, 0, 1, 1, 2]
    assert uniform_frame_indices(9, 1) == [0]
    for total, n in [(100, 12), (12, 12), (7, 12)]:
        idx = uniform_frame_indices(total, n)
        assert len(idx) == n and idx[0] == 0 and idx[-1] == total - 1 and idx == sorted(idx)


def test_a_real_mp4_decodes_to_the_sampled_frames_and_their_pixels(tmp_path):
    path = tmp_path / "grey.mp4"
    path.write_bytes(encode_mp4(grey_frames(GREYS), fps=8))
    clip = decode_clip(path, 5)
    assert clip.total == 16 and clip.indices == [0, 3, 7, 11, 15] and not clip.short and not clip.truncated
    assert all(f.size == (32, 32) and f.mode == "RGB" for f in clip.frames)
    got = [grey_level(f) for f in clip.frames]
    want = [GREYS[i] for i in clip.indices]
    assert max(abs(g - w) for g, w in zip(got, want)) < 3  # H.264 at crf 12: within a few levels
    # bytes and the file decode alike
    assert [grey_level(f) for f in decode_clip(path.read_bytes(), 5).frames] == got


def test_a_clip_shorter_than_n_frames_repeats_its_frames_and_says_so(tmp_path):
    clip = decode_clip(encode_mp4(grey_frames(GREYS[:3]), fps=8), 5)
    assert clip.short and clip.total == 3 and clip.indices == [0, 0, 1, 1, 2]
    levels = [grey_level(f) for f in clip.frames]
    assert levels[0] == levels[1] and levels[2] == levels[3] and abs(levels[4] - GREYS[2]) < 3


def test_a_truncated_mp4_and_a_zero_length_file_are_bad_videos_named(tmp_path):
    good = encode_mp4(grey_frames(GREYS), fps=8)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(BadVideo, match="empty.mp4: zero-length") as err:
        decode_clip(tmp_path / "empty.mp4", 4)
    assert err.value.reason == "empty_video"
    with pytest.raises(BadVideo, match="clip 7") as err:
        decode_clip(good[: len(good) // 3], 4, "clip 7")
    assert err.value.reason == "bad_video"
    with pytest.raises(BadVideo, match="over the limit of 8") as err:
        decode_clip(good, 4, "long", max_frames=8)
    assert err.value.reason == "video_too_long"


def _shard_of(tmp_path, videos: dict[str, bytes | None]):
    records = [VideoRecord(v, f"clip {name}", {"id": name}) for name, v in videos.items()]
    write_video_shards(records, tmp_path / "shards", per_shard=10)
    return str(tmp_path / "shards")


def test_a_split_with_damaged_videos_counts_and_names_them_and_keeps_the_rest(tmp_path):
    good = encode_mp4(grey_frames(GREYS), fps=8)
    folder = _shard_of(
        tmp_path,
        {"a": good, "trunc": good[: len(good) // 2], "empty": b"", "short": encode_mp4(grey_frames(GREYS[:2]), 8)},
    )
    split = load_video_split(folder, 4)
    assert [s.caption for s in split.samples] == ["clip a", "clip short"]
    assert split.skipped == {"bad_video": 1, "empty_video": 1, "short_video": 1}
    assert any("sample 000000001" in b and "does not decode" in b for b in split.bad)  # the truncated one
    assert any("sample 000000002" in b and "zero-length" in b for b in split.bad)
    assert all(len(s.frames) == 4 for s in split.samples)


def test_video_shards_have_video2datasets_layout(tmp_path):
    import json
    import tarfile

    folder = tmp_path / "shards"
    recs = [VideoRecord(b"\x00mp4", "a red circle grows", {"id": "x"}), VideoRecord(None, "gone", {}, "404")]
    assert write_video_shards(recs, folder, per_shard=5) == 1
    with tarfile.open(folder / "00000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("000000000.json").read())
    assert names == ["000000000.json", "000000000.mp4", "000000000.txt"]
    assert meta["caption"] == "a red circle grows" and meta["status"] == "success" and meta["id"] == "x"
    stats = json.loads((folder / "00000_stats.json").read_text())
    assert stats["count"] == 2 and stats["successes"] == 1 and stats["status_dict"] == {"404": 1, "success": 1}
    assert list(pd.read_parquet(folder / "00000.parquet")["status"]) == ["success", "failed"]


# -- the model ---------------------------------------------------------------------------------------
def clip_frames(n=5, seed=0):
    rng = random.Random(seed)
    return [Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3))) for _ in range(n)]


def test_encode_video_under_mean_pooling_is_the_renormalised_mean_of_encode_image(tokenizer):
    m = tiny_model(tokenizer)
    assert m.cfg.video.pooling == "mean" and not list(m.temporal.parameters())
    clips = [clip_frames(m.cfg.video.num_frames, s) for s in range(3)]
    with torch.no_grad():
        got = m.encode_video(clips)
        want = torch.stack([F.normalize(m.encode_image(c).mean(0), dim=-1) for c in clips])
    assert got.shape == (3, m.cfg.embed_dim)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-5)


def _temporal(tokenizer):
    m = tiny_model(tokenizer)
    cfg = m.cfg.model_copy(update={"video": m.cfg.video.model_copy(update={"pooling": "transformer", "heads": 2})})
    torch.manual_seed(1)
    return MultiPromptCLIP(cfg, m.text, m.vision).eval()


def test_the_temporal_model_tells_a_clip_from_its_reverse_and_mean_pooling_cannot(tokenizer):
    frames = clip_frames(8)
    mean, temporal = tiny_model(tokenizer), _temporal(tokenizer)
    with torch.no_grad():
        a, b = mean.encode_video([frames, frames[::-1]])
        assert torch.allclose(a, b, atol=1e-6)
        a, b = temporal.encode_video([frames, frames[::-1]])
    assert (a - b).abs().max() > 1e-3


def test_the_temporal_model_saved_and_reloaded_gives_identical_embeddings(tokenizer, tmp_path):
    m = _temporal(tokenizer)
    assert sum(p.numel() for p in m.temporal.parameters()) > 0
    clips = [clip_frames(8, s) for s in range(2)]
    m.save_pretrained(tmp_path / "m")
    back = MultiPromptCLIP.from_pretrained(tmp_path / "m")
    assert back.cfg.video == m.cfg.video
    with torch.no_grad():
        assert torch.equal(m.encode_video(clips), back.encode_video(clips))


# -- metrics -------------------------------------------------------------------------------------------
def brute_force(scores: torch.Tensor, positives: torch.Tensor, ks) -> dict:
    """One query at a time: the rank of its best positive with ties broken at random, in expectation."""
    ranks, hits = [], {k: [] for k in ks}
    for q in range(scores.shape[0]):
        best = max(float(scores[q, j]) for j in range(scores.shape[1]) if positives[q, j])
        higher = sum(1 for j in range(scores.shape[1]) if not positives[q, j] and scores[q, j] > best + TIE)
        tied = sum(1 for j in range(scores.shape[1]) if not positives[q, j] and abs(scores[q, j] - best) <= TIE)
        ranks.append(1 + higher + tied / 2)
        for k in ks:  # the positive lands uniformly among the tied + 1 slots after `higher`
            hits[k].append(sum(1 for slot in range(tied + 1) if higher + slot < k) / (tied + 1))
    out = {f"R@{k}": statistics.fmean(h) for k, h in hits.items()}
    return {**out, "MdR": statistics.median(ranks), "MnR": statistics.fmean(ranks)}


def test_video_metrics_match_a_one_query_at_a_time_brute_force_with_ties():
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(9, 6, generator=g), dim=-1)
    video = F.normalize(torch.randn(7, 6, generator=g), dim=-1)
    video[3] = video[2]  # two clips the model cannot tell apart
    positives = torch.zeros(9, 7, dtype=torch.bool)
    for t in range(9):
        positives[t, t % 7] = True
    positives[8, 5] = True  # a caption with two clips
    got = video_retrieval_metrics(text, video, positives, (1, 2, 5))
    scores = text @ video.T
    for prefix, s, p in (("text_to_video", scores, positives), ("video_to_text", scores.T, positives.T)):
        want = brute_force(s, p, (1, 2, 5))
        for name, value in want.items():
            assert got[f"{prefix}_{name}"] == pytest.approx(value, abs=1e-6), (prefix, name)


# -- the moving-shapes world ----------------------------------------------------------------------------
def test_the_video_world_pairs_each_test_clip_with_its_reverse_and_unseen_captions():
    plan = plan_video_splits(40, 6, seed=3)
    train = {s.caption() for s in plan.train}
    assert len(train) == 40 and len(plan.test_pairs) == 6
    for s in plan.test_pairs:
        r = s.reversed()
        assert r.reversed() == s and r.caption() != s.caption()
        assert not {s.caption(), r.caption()} & train
    assert plan_video_splits(40, 6, seed=3) == plan  # the same plan from the same seed


def test_a_clip_moves_its_object_the_way_its_caption_says():
    scene = ClipScene("red", "square", "plain gray", "left_to_right")
    assert scene.caption() == "a red square moves from left to right on a plain gray background"
    assert scene.reversed().caption() == "a red square moves from right to left on a plain gray background"
    frames = [np.asarray(f, dtype=np.int32) for f in render_clip(scene, 32, 5, seed=1)]
    red = [np.argwhere((f[..., 0] > 180) & (f[..., 1] < 90)) for f in frames]  # the red pixels of each frame
    xs = [r[:, 1].mean() for r in red]
    assert all(len(r) > 10 for r in red) and xs == sorted(xs) and xs[-1] - xs[0] > 12
    turns = ClipScene("red", "circle", "plain gray", "turns", "blue")
    assert turns.caption() == "a red circle turns blue on a plain gray background"
    assert turns.reversed().caption() == "a blue circle turns red on a plain gray background"


def test_mean_pooling_is_exactly_at_chance_on_the_motion_pairs(tokenizer, tmp_path):
    from mpe.config import DataConfig
    from mpe.data.video_sources import write_video_world

    cfg = DataConfig(image_size=32, video={"shapes": {"train_captions": 4, "test_pairs": 5, "frames": 15}})
    write_video_world(cfg, 0, tmp_path, {"video_test": "test"})
    m = tiny_model(tokenizer)
    res = evaluate_videos(m, str(tmp_path / "shards" / "video_test"), lambda t: m.encode_text(t), ks=(1, 5))
    v = res["video"]
    assert v["n_videos"] == 10 and v["motion_pairs"] == 5 and res["bad_videos"] == []
    assert v["motion_video_to_text_accuracy"] == 0.5 and v["motion_text_to_video_accuracy"] == 0.5
    assert v["text_to_video_R@1"] <= 0.5  # each caption ties with its reversed clip: at best half a hit


# -- MSR-VTT -----------------------------------------------------------------------------------------------
def _msrvtt(tmp_path, n=6):
    videos = tmp_path / "MSRVTT" / "videos" / "all"
    videos.mkdir(parents=True)
    rows = []
    for i in range(n):
        rng = random.Random(i)
        frames = [Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3))) for _ in range(10)]
        (videos / f"video{7000 + i}.mp4").write_bytes(encode_mp4(frames, fps=4))
        rows.append({"key": f"ret{i}", "vid_key": f"msr{7000 + i}", "video_id": f"video{7000 + i}",
                     "sentence": f"a clip of colour number {i}"})  # fmt: skip
    csv_path = tmp_path / "msrvtt_data" / "MSRVTT_JSFUSION_test.csv"
    csv_path.parent.mkdir()
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["key", "vid_key", "video_id", "sentence"])
        w.writeheader()
        w.writerows(rows)
    return MsrvttBenchmark(name="msrvtt", kind="msrvtt", path=str(csv_path), video_root=str(videos)), videos


def test_msrvtt_scores_match_brute_force_over_one_video_at_a_time(tokenizer, tmp_path):
    cfg, videos = _msrvtt(tmp_path)
    data = read_msrvtt(cfg)
    assert len(data.videos) == 6 and data.caption_video == list(range(6))
    m = tiny_model(tokenizer)
    got = score(m, data, lambda t: m.encode_text(t), ks=(1, 5), batch_size=4)
    with torch.no_grad():
        text = torch.cat([m.encode_text([c]) for c in data.captions])
        video = torch.cat([m.encode_video([decode_clip(v.path, m.cfg.video.num_frames).frames]) for v in data.videos])
    scores = text @ video.T
    eye = torch.eye(6, dtype=torch.bool)
    for prefix, s in (("text_to_video", scores), ("video_to_text", scores.T)):
        for name, value in brute_force(s, eye, (1, 5)).items():
            assert got[f"{prefix}_{name}"] == pytest.approx(value, abs=1e-5), (prefix, name)
    assert got["n_videos"] == 6 and got["skipped_videos"] == {} and got["bad_videos"] == []


def test_msrvtt_counts_and_names_a_zero_length_and_a_truncated_video(tokenizer, tmp_path):
    cfg, videos = _msrvtt(tmp_path)
    (videos / "video7001.mp4").write_bytes(b"")
    whole = (videos / "video7004.mp4").read_bytes()
    (videos / "video7004.mp4").write_bytes(whole[: len(whole) // 3])
    m = tiny_model(tokenizer)
    got = score(m, read_msrvtt(cfg), lambda t: m.encode_text(t), ks=(1,), batch_size=4)
    assert got["n_videos"] == 4 and got["n_texts"] == 4
    assert got["skipped_videos"] == {"empty_video": 1, "bad_video": 1}
    assert any("row 2" in b and "video7001.mp4" in b and "zero-length" in b for b in got["bad_videos"])
    assert any("row 5" in b and "video7004.mp4" in b for b in got["bad_videos"])


def test_msrvtt_refuses_a_missing_column_or_video_naming_it(tmp_path):
    cfg, videos = _msrvtt(tmp_path)
    (videos / "video7002.mp4").unlink()
    with pytest.raises(DataError, match=r"row 3 .*video7002.mp4"):
        read_msrvtt(cfg)
    bad = tmp_path / "bad.csv"
    bad.write_text("key,video\nret0,video7000\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['video_id', 'sentence'\]"):
        read_msrvtt(cfg.model_copy(update={"path": str(bad)}))


# -- config and serving ---------------------------------------------------------------------------------------
def test_video_sources_need_their_keys_named():
    with pytest.raises(ValueError, match="video.folder"):
        DataConfig(source="video_folder")
    with pytest.raises(ValueError, match="video.webdataset"):
        DataConfig(source="video_webdataset")


def test_params_name_the_video_pooling_key(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model:\n  video: {pooling: lstm}\n")
    with pytest.raises(ConfigError, match="model.video.pooling"):
        load_params(path)


def test_a_served_video_row_is_embedded_like_encode_video_and_a_bad_one_is_named(tokenizer):
    m = tiny_model(tokenizer)
    mp4 = encode_mp4(grey_frames(GREYS), fps=8)
    df = pd.DataFrame({"text": ["a grey clip", None], "video": [None, base64.b64encode(mp4).decode()]})
    out = embed_rows(m, df)
    with torch.no_grad():
        want = m.encode_video([decode_clip(mp4, m.cfg.video.num_frames).frames])
    assert np.allclose(out[1], want[0].numpy(), atol=1e-6)
    bad = pd.DataFrame({"video": [base64.b64encode(mp4[:200]).decode()]})
    with pytest.raises(DataError, match=r"row 0: 'video' \(200 bytes\)"):
        embed_rows(m, bad)
    both = pd.DataFrame({"text": ["x"], "video": [base64.b64encode(mp4).decode()]})
    with pytest.raises(DataError, match="row 0: has both 'text' and 'video'"):
        embed_rows(m, both)


# -- the video sources of the data stage ------------------------------------------------------------------------
def test_a_video_folder_and_caption_csv_become_train_and_test_shards_counting_bad_files(tmp_path):
    import json

    from mpe.data.stats import shard_stats
    from mpe.data.video_sources import write_video_collection

    videos = tmp_path / "videos"
    videos.mkdir()
    rows = []
    for i in range(12):
        (videos / f"v{i}.mp4").write_bytes(encode_mp4(grey_frames(GREYS[i : i + 3]), fps=4))
        rows.append(f"v{i}.mp4,clip number {i}")
    (videos / "v3.mp4").write_bytes(b"")  # zero-length
    rows.append("gone.mp4,a clip that is not there")
    (tmp_path / "captions.csv").write_text("video,caption\n" + "\n".join(rows) + "\n")
    cfg = DataConfig(
        source="video_folder",
        test_fraction=0.25,
        video={"folder": str(videos), "captions": str(tmp_path / "captions.csv")},
    )
    assert write_video_collection(cfg, tmp_path / "out") == ["train", "test"]
    train, test = (shard_stats(tmp_path / "out" / "shards" / s) for s in ("train", "test"))
    assert train["count"] + test["count"] == 13 and train["successes"] + test["successes"] == 11
    status = {**train["status"], **test["status"]}
    assert any(k.startswith("zero-length video") and "v3.mp4" in k for k in status)
    assert any(k.startswith("no such file") and "gone.mp4" in k for k in status)
    split = load_video_split(str(tmp_path / "out" / "shards" / "train"), 3)
    assert split.bad == [] and {s.meta["id"] for s in split.samples} <= {f"v{i}.mp4" for i in range(12)}
    again = tmp_path / "again"
    write_video_collection(cfg, again)  # a clip's split follows from its name alone
    for s in ("train", "test"):
        a = json.loads((tmp_path / "out" / "shards" / s / "00000_stats.json").read_text())
        assert a == json.loads((again / "shards" / s / "00000_stats.json").read_text())


def test_shards_video2dataset_wrote_elsewhere_are_read_as_a_source(tmp_path):
    import json
    import tarfile

    from mpe.data.video_sources import write_video_collection

    folder = tmp_path / "v2d"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:  # video2dataset's webdataset: key.mp4, key.txt, key.json
        for i in range(8):
            key = f"00000{i:04d}"
            for ext, data in (
                ("mp4", encode_mp4(grey_frames(GREYS[i : i + 4]), fps=4)),
                ("txt", f"a grey clip {i}".encode()),
                ("json", json.dumps({"url": f"http://example.invalid/{i}.mp4", "key": key}).encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    cfg = DataConfig(source="video_webdataset", test_fraction=0.3, video={"webdataset": str(folder)})
    write_video_collection(cfg, tmp_path / "out")
    samples = [
        s for split in ("train", "test") for s in load_video_split(str(tmp_path / "out" / "shards" / split), 4).samples
    ]
    assert sorted(s.caption for s in samples) == sorted(f"a grey clip {i}" for i in range(8))
    assert all(len(s.frames) == 4 for s in samples)


def test_the_gates_mean_recall_leaves_zero_shot_video_out_of_an_image_run_and_uses_it_in_a_video_run():
    from mpe.tracking.gate import gate_score

    image_run = {"text_to_image_R@1": 0.2, "image_to_text_R@1": 0.4, "text_to_video_R@1": 0.9, "text_to_video_MdR": 3}
    assert gate_score(image_run, "mean_recall") == pytest.approx(0.3)
    video_run = {"text_to_video_R@1": 0.5, "video_to_text_R@1": 0.7, "text_to_video_MdR": 2.0}
    assert gate_score(video_run, "mean_recall") == pytest.approx(0.6)
