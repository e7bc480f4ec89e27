"""The evaluate stage with ``evaluate.benchmarks``: results in metrics/eval.json and on the MLflow run as
``eval.<benchmark>.<metric>``; a missing benchmark file fails before any model loads."""

import csv
import json

import mlflow
import pytest

from mpe.config import load_params
from mpe.errors import DataError
from mpe.model.multi_prompt_clip import MultiPromptCLIP
from tests.project_config import small_params, write_params
from tests.unit.test_benchmark_sets import captions_of, picture


def _benchmark_files(root):
    (root / "images").mkdir(parents=True)
    entries = []
    for i in range(3):
        picture(i).save(root / "images" / f"{i}.jpg")
        entries.append({"filename": f"{i}.jpg", "split": "test", "sentences": [{"raw": c} for c in captions_of(i)]})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": entries}))
    with (root / "mcq.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "caption_0", "caption_1", "correct_answer"])
        w.writerow(["images/0.jpg", "a red circle", "no red circle", 0])
        w.writerow(["images/1.jpg", "no green square", "a green square", 1])
    return [
        {
            "name": "flickr",
            "kind": "karpathy",
            "path": str(root / "dataset_flickr30k.json"),
            "image_root": str(root / "images"),
        },
        {"name": "neg", "kind": "negbench_mcq", "path": str(root / "mcq.csv")},
    ]


def _params(project, tiny_base_dir, tmp_path, benchmarks):
    root, _ = project
    data = small_params(
        root,
        tiny_base_dir,
        train={"out_dir": str(tmp_path / "trained")},
        metrics_dir=str(tmp_path / "metrics"),
        evaluate={
            "plots_dir": str(tmp_path / "plots"),
            "compare_untrained": False,
            "benchmarks": benchmarks,
        },
        mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}", "artifact_root": str(tmp_path / "mlartifacts")},
    )
    return load_params(write_params(tmp_path, data))


def test_benchmark_metrics_reach_eval_json_and_mlflow(project, tiny_base_dir, tmp_path):
    from mpe.records import TrainingSummary
    from mpe.stages.evaluate import run as run_evaluate_stage
    from mpe.tracking.runs import use
    from mpe.tracking.settings import tracking_settings

    params = _params(project, tiny_base_dir, tmp_path, _benchmark_files(tmp_path / "bench"))
    # an untrained model stands in for the train stage's output (this test is about the evaluate stage)
    MultiPromptCLIP.from_base(params.base_model.out_dir, params.model, seed=0).save_pretrained(params.train.out_dir)
    use(tracking_settings(params.mlflow))
    with mlflow.start_run() as run:
        pass
    (tmp_path / "metrics").mkdir()
    summary = TrainingSummary(
        steps=0, total_steps=0, train_samples=0, ray_run_name="none", mlflow_run_id=run.info.run_id
    )
    (tmp_path / "metrics" / "train.json").write_text(json.dumps(summary.to_json()))

    report = run_evaluate_stage(params)
    saved = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    expected = {f"flickr.{d}_R@{k}" for d in ("text_to_image", "image_to_text") for k in (1, 5, 10)} | {"neg.accuracy"}
    assert expected <= set(saved["trained"])
    assert saved["benchmarks"]["flickr"]["n_images"] == 3 and saved["benchmarks"]["flickr"]["n_texts"] == 15
    assert saved["benchmarks"]["neg"]["n_questions"] == 2 and saved["trained"]["neg.accuracy"] in (0.0, 0.5, 1.0)
    assert saved["trained"]["flickr.text_to_image_R@5"] == 1.0  # 3 images
    logged = mlflow.MlflowClient().get_run(run.info.run_id).data.metrics
    for key in expected:
        assert logged[f"eval.{key}".replace("@", "_at_")] == pytest.approx(saved["trained"][key])  # MLflow has no @
    assert "text_to_image_R@1" in report["trained"] and "chance" in report  # the test split as before


def test_a_missing_benchmark_fails_before_any_model_loads(project, tiny_base_dir, tmp_path):
    from mpe.stages.evaluate import run as run_evaluate_stage

    missing = [{"name": "coco", "kind": "karpathy", "path": str(tmp_path / "coco" / "dataset_coco.json")}]
    params = _params(project, tiny_base_dir, tmp_path, missing)  # no model in train.out_dir either
    with pytest.raises(DataError, match=r"coco/dataset_coco.json: benchmark file not found; expected Karpathy's"):
        run_evaluate_stage(params)
