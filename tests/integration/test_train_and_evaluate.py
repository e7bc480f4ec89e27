"""Ray Train with 2 workers for real: an injected worker failure restarts from the last checkpoint,
a rerun with the same name resumes, rank 0 logs to MLflow; evaluation matches CLIP_benchmark."""

import json
from pathlib import Path

import mlflow
import pytest
import torch

from mpe.config import load_params
from mpe.model.multi_prompt_clip import MultiPromptCLIP
from tests.project_config import copy_project, small_params, write_params


@pytest.fixture(scope="module")
def trained(project, tiny_base_dir, ray_session):
    from mpe.stages.train import run as run_train_stage

    root, _ = project
    data = small_params(root, tiny_base_dir, train={"fail_at_step": 3, "max_failures": 1, "log_sample_keys": True})
    params = load_params(write_params(root, data))
    summary = run_train_stage(params)
    return root, params, summary


def test_failure_restarts_from_last_checkpoint(trained):
    root, params, summary = trained
    assert summary["steps"] == summary["total_steps"] == 6
    assert summary["restored_from_step"] == 2  # checkpoint at step 2, failure before step 4
    assert (Path(params.train.storage_path) / summary["ray_run_name"] / ".injected_failure").exists()
    history = json.loads((root / "metrics" / "train_history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)


def _keys_by_step(run_dir: Path) -> dict[int, dict[int, list[str]]]:
    """{rank: {step: keys}} from the key logs; a step trained again after a restart keeps its last record."""
    out = {}
    for log in sorted((run_dir / "sample_keys").glob("rank*.jsonl")):
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        out[int(log.stem[4:])] = {r["step"]: r["keys"] for r in rows}
    return out


def test_a_restarted_run_trains_on_exactly_the_samples_of_an_uninterrupted_one(trained, tiny_base_dir):
    from mpe.stages.train import run as run_train_stage

    root, params, summary = trained
    resumed = _keys_by_step(Path(params.train.storage_path) / summary["ray_run_name"])
    data = small_params(
        root,
        tiny_base_dir,
        train={"log_sample_keys": True, "run_name": "uninterrupted", "out_dir": str(root / "models" / "uninterrupted")},
        metrics_dir=str(root / "metrics-uninterrupted"),
    )
    straight = run_train_stage(load_params(write_params(root, data)))
    assert straight["restored_from_step"] is None
    reference = _keys_by_step(Path(params.train.storage_path) / straight["ray_run_name"])
    assert set(resumed) == set(reference) == {0, 1}
    for rank in reference:
        assert sorted(reference[rank]) == list(range(1, 7))
        assert resumed[rank] == reference[rank], rank
    assert len({k for r in reference.values() for keys in r.values() for k in keys}) > 16  # not one batch over again
    assert 0 <= summary["data_wait_share"] < 1
    write_params(root, small_params(root, tiny_base_dir))


def test_trained_folder_loads_and_differs_from_untrained(trained):
    root, params, _ = trained
    m = MultiPromptCLIP.from_pretrained(params.train.out_dir)
    assert m.provenance["ray_run_name"].startswith(params.train.run_name + "-")
    base = MultiPromptCLIP.from_base(params.base_model.out_dir, params.model)
    with torch.no_grad():
        a, b = m.encode_text(["a red circle"]), base.encode_text(["a red circle"])
    assert (a - b).abs().max() > 1e-3


def test_rank0_logged_params_metrics_and_model_to_mlflow(trained):
    root, params, summary = trained
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.params["model.text.num_prompts"] == "2"
    assert run.data.tags["ray_run_name"] == summary["ray_run_name"]
    client = mlflow.MlflowClient()
    losses = client.get_metric_history(run.info.run_id, "loss")
    # steps trained again after the restart are logged once: metrics go out with their checkpoint
    assert sorted(m.step for m in losses) == list(range(1, 7))
    assert client.get_metric_history(run.info.run_id, "restored_from_step")[0].value == 2


def test_logged_pyfunc_embeds_text_and_images_like_the_model(trained):
    import base64
    import io

    import pandas as pd
    from PIL import Image

    root, params, summary = trained
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    pyfunc = mlflow.pyfunc.load_model(summary["model_uri"])
    img = Image.new("RGB", (32, 32), (20, 200, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    df = pd.DataFrame({"text": ["a red circle", None], "image": [None, base64.b64encode(buf.getvalue()).decode()]})
    out = pyfunc.predict(df)
    m = MultiPromptCLIP.from_pretrained(params.train.out_dir)
    with torch.no_grad():
        t, v = m.encode_text(["a red circle"]), m.encode_image([img])
    assert out.shape == (2, 64)
    assert abs(out[0] - t[0].numpy()).max() < 1e-5 and abs(out[1] - v[0].numpy()).max() < 1e-5
    with pytest.raises(Exception, match="neither a 'text'"):
        pyfunc.predict(pd.DataFrame({"text": [None], "image": [None]}))


def test_rerun_with_the_same_inputs_resumes(trained, tiny_base_dir):
    from mpe.stages.train import run as run_train_stage

    root, _, _ = trained
    # what is checkpointed and logged, not what a step computes: the finished run is resumed, nothing is left
    data = small_params(root, tiny_base_dir, train={"checkpoint_every": 3, "log_every": 2})
    summary = run_train_stage(load_params(write_params(root, data)))
    assert summary["ray_run_name"] == trained[2]["ray_run_name"]
    assert summary["restored_from_step"] == 6 and summary["steps"] == 6


def test_changed_inputs_start_a_new_run(project, tiny_base_dir):
    from mpe.training.run_identity import run_fingerprint

    root, params = project

    def fp(train, steps=6, model_files=None):
        return run_fingerprint(
            params.seed, params.model, train, params.base_model, None, None, steps=steps, model_files=model_files
        )

    assert fp(params.train.model_copy(update={"lr": 1e-3})) != fp(params.train)
    assert fp(params.train, steps=99) != fp(params.train)  # the schedule: a new total of steps
    assert fp(params.train, model_files={"vision": "a"}) != fp(params.train, model_files={"vision": "b"})
    kept = {"checkpoint_every": 1, "log_every": 3, "keep_checkpoints": 5, "max_steps": 6, "epochs": 3.0}
    assert fp(params.train.model_copy(update=kept)) == fp(params.train)  # the same steps, computed the same


def test_evaluation_matches_clip_benchmark_on_the_same_embeddings(trained):
    from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k

    from mpe.cache.compute import cache_fields
    from mpe.cache.store import TextStates, open_active
    from mpe.data.loader import load_split
    from mpe.evaluation.tasks import TextEmbedder, embed_images
    from mpe.stages.evaluate import run as run_evaluate_stage

    root, params, _ = trained
    report = run_evaluate_stage(params)
    assert (root / "plots" / "recall.png").stat().st_size > 0 and (root / "plots" / "loss.png").exists()
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    logged = {
        a.path
        for a in mlflow.MlflowClient().list_artifacts(
            json.loads((root / "metrics" / "train.json").read_text())["mlflow_run_id"], "plots"
        )
    }
    assert {"plots/loss.png", "plots/recall.png", "plots/prompt_maps.png"} <= logged
    model = MultiPromptCLIP.from_pretrained(params.train.out_dir)
    test, _ = load_split(root / "data" / "shards" / "test")
    texts = list(dict.fromkeys(s.caption for s in test))
    cache = TextStates(
        open_active(
            params.cache.root, cache_fields(Path(params.base_model.out_dir), params.model.text, params.cache.dtype)
        )
    )
    t = TextEmbedder(model, cache)(texts)
    v = embed_images(model, [s.image for s in test])
    pos = torch.tensor([[s.caption == x for s in test] for x in texts])
    scores = t @ v.T
    for k in (1, 5, 10):
        t2i = (recall_at_k(scores, pos, k) > 0).float().mean().item()
        i2t = (recall_at_k(scores.T, pos.T, k) > 0).float().mean().item()
        assert report["trained"][f"text_to_image_R@{k}"] == pytest.approx(t2i, abs=1e-6)
        assert report["trained"][f"image_to_text_R@{k}"] == pytest.approx(i2t, abs=1e-6)
    assert 0 <= report["trained"]["negation_accuracy"] <= 1
    assert report["chance"]["text_to_image_R@1"] == pytest.approx(1 / len(test))


def test_hard_negatives_need_their_cached_states_then_train_with_both_losses(project, tmp_path, ray_session):
    """With train.hard_negatives on, training refuses a cache without the negatives' states (named); the cache
    stage then adds only them (every caption shard reused), and a run trains on them, with the clip and the
    siglip loss."""
    from mpe.errors import StageInputError
    from mpe.stages import cache
    from mpe.stages.train import run as run_train_stage

    path = copy_project(
        project,
        tmp_path,
        train={"hard_negatives": {"enabled": True, "per_caption": 2}, "max_steps": 2, "num_workers": 2},
    )
    params = load_params(path)
    with pytest.raises(StageInputError, match="hard-negatives shard"):
        run_train_stage(params)
    summary = cache.run(params)
    assert summary["shards_computed"] == 0 and summary["negative_shards_computed"] == summary["data_shards"]
    assert cache.run(params)["negative_shards_computed"] == 0  # current: kept
    for kind in ("clip", "siglip"):
        p = load_params(path, [f"model.loss.kind={kind}", f"train.run_name=hn-{kind}"])
        result = run_train_stage(p)
        history = json.loads((tmp_path / "metrics" / "train_history.json").read_text())
        assert result["steps"] == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
