"""The video path through the real stages on a small moving-shapes world: the data stage writes video shards,
the cache stage caches their captions, Ray Train trains on clips decoded in the loader workers (an
injected worker failure resumes from the last checkpoint), evaluate scores text↔video retrieval; a video
stream resumes on exactly the clips an uninterrupted one reads; damaged clips are counted and named."""

import json
import tarfile
from pathlib import Path

import pytest
import torch

from mpe.config import load_params
from mpe.data.train_stream import StreamSpec, TrainLoader
from tests.project_config import small_params, write_params

VIDEO_DATA = {
    "source": "video_shapes",
    "samples_per_shard": 12,
    "video": {"shapes": {"train_captions": 12, "clips_per_caption": 2, "test_pairs": 4, "frames": 9}},
}
VIDEO_MODEL = {"video": {"num_frames": 4, "pooling": "transformer", "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def video_project(tiny_base_dir, tmp_path_factory, ray_session):
    from mpe.stages import base_model, cache, data, evaluate, train

    root = tmp_path_factory.mktemp("video")
    failing = {"batch_size": 8, "fail_at_step": 3, "max_failures": 1}
    p = small_params(root, tiny_base_dir, data=VIDEO_DATA, model=VIDEO_MODEL, train=failing)
    params = load_params(write_params(root, p))
    stats = data.run(params)
    base_model.run(params)
    cached = cache.run(params)
    summary = train.run(params)
    report = evaluate.run(params)
    return root, params, stats, cached, summary, report


def test_the_data_stage_writes_video_shards_in_video2datasets_layout(video_project):
    root, params, stats, *_ = video_project
    assert stats["modality"] == "video"
    assert stats["splits"]["train"]["successes"] == 24 and stats["splits"]["test"]["successes"] == 8
    with tarfile.open(sorted((root / "data" / "shards" / "train").glob("*.tar"))[0]) as tar:
        names = tar.getnames()
    assert names[:3] == ["000000000.json", "000000000.mp4", "000000000.txt"]
    assert json.loads((root / "data" / "negation.json").read_text()) == []


def test_ray_train_trains_on_clips_through_the_text_cache_and_resumes_after_a_failure(video_project):
    _, params, _, cached, summary, _ = video_project
    assert cached["shards_computed"] == 2 and cached["texts_computed"] > 0
    assert summary["steps"] == summary["total_steps"] == 6
    assert summary["restored_from_step"] == 2  # checkpoint at step 2, failure before step 4
    assert 0 <= summary["data_wait_share"] < 1 and summary["skipped_samples"] == {}


def test_evaluate_scores_text_video_retrieval_and_the_motion_pairs(video_project):
    root, params, *_, report = video_project
    t = report["trained"]
    for key in ("text_to_video_R@1", "video_to_text_R@5", "text_to_video_MdR", "video_to_text_MnR"):
        assert key in t
    assert "text_to_image_R@1" not in t  # a video source has no image test split
    assert t["motion_video_to_text_accuracy"] in {i / 8 for i in range(9)}  # 4 pairs, 2 clips each
    assert report["chance"]["text_to_video_R@1"] == pytest.approx(1 / 8)
    assert report["details"]["trained"]["video"]["n_videos"] == 8
    import mlflow

    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    run = mlflow.get_run(json.loads((root / "metrics" / "train.json").read_text())["mlflow_run_id"])
    assert run.data.metrics["eval.text_to_video_R_at_1"] == pytest.approx(t["text_to_video_R@1"])


def _spec(root: Path, **kw) -> StreamSpec:
    shards = tuple(str(p) for p in sorted((root / "data" / "shards" / "train").glob("*.tar")))
    base = dict(data_shards=shards, cache_shards=None, batch_size=4, image_size=32, shuffle_buffer=6, seed=1)
    return StreamSpec(**{**base, "workers": 2, "num_frames": 4, **kw})


def test_a_video_stream_resumes_on_exactly_the_clips_of_an_uninterrupted_one(video_project):
    root = video_project[0]
    whole = TrainLoader(_spec(root))
    expected = [next(whole)["keys"] for _ in range(10)]
    whole.close()
    first = TrainLoader(_spec(root))
    got = [next(first)["keys"] for _ in range(4)]
    state = first.state()
    first.close()
    resumed = TrainLoader(_spec(root), resume=state, step=4)
    got += [next(resumed)["keys"] for _ in range(6)]
    resumed.close()
    assert got == expected


def test_a_video_batch_is_uint8_frames_and_damaged_clips_are_skipped_and_counted(video_project, tmp_path):
    from mpe.data.video_shards import VideoRecord, write_video_shards

    root = video_project[0]
    good = []
    with tarfile.open(sorted((root / "data" / "shards" / "train").glob("*.tar"))[0]) as tar:
        for m in tar:
            if m.name.endswith(".mp4") and len(good) < 3:
                good.append(tar.extractfile(m).read())
    recs = [VideoRecord(good[0][:300], "truncated"), VideoRecord(b"", "empty")]  # read first
    recs += [VideoRecord(v, f"clip {i}") for i, v in enumerate(good)]
    write_video_shards(recs, tmp_path / "bad", per_shard=10)
    spec = _spec(root, data_shards=(str(tmp_path / "bad" / "00000.tar"),), batch_size=3, workers=0, shuffle_buffer=1)
    loader = TrainLoader(spec)
    batch = next(loader)
    assert batch["pixels"].dtype == torch.uint8 and batch["pixels"].shape == (3, 4, 3, 32, 32)
    assert sorted(batch["captions"]) == ["clip 0", "clip 1", "clip 2"]
    assert loader.skipped_total() == {"bad_video": 1, "empty_video": 1}
    loader.close()
