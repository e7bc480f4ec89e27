"""The records stages hand each other (mpe.records) survive their round trips: an evaluation report through
MLflow's metric keys and back, the training summary through its file."""

from mpe.records import (
    SECTIONS,
    TrainingSummary,
    flat_name,
    from_mlflow,
    metric_name,
    mlflow_key,
    report_sections,
    short_name,
    to_mlflow,
    training_run_id,
)

REPORT = {
    "trained": {
        "text_to_image_R@1": 0.5,
        "image_to_text_R@10": 0.9,
        "negation_accuracy": 0.7,
        "flickr30k.text_to_image_R@5": 0.4,
    },
    "untrained": {"text_to_image_R@1": 0.1},
    "analysis": {"trained": {"inter_prompt_cosine": -0.1}, "untrained": {"inter_prompt_cosine": 0.9}},
    "val": {"trained": {"text_to_image_R@1": 0.45}},
    "chance": {"text_to_image_R@1": 0.01},
}


def test_a_report_round_trips_through_mlflow_keys():
    keys = to_mlflow(report_sections(REPORT))
    assert all("@" not in k for k in keys)  # MLflow refuses '@' in a metric name
    assert keys["eval.text_to_image_R_at_1"] == 0.5 and keys["eval.flickr30k.text_to_image_R_at_5"] == 0.4
    assert keys["eval_untrained_analysis.inter_prompt_cosine"] == 0.9
    back = from_mlflow({**keys, "loss": 1.0, "restored_from_step": 3})  # a training run's own metrics are left out
    assert back == {
        "trained": REPORT["trained"],
        "untrained": REPORT["untrained"],
        "analysis": REPORT["analysis"]["trained"],
        "untrained_analysis": REPORT["analysis"]["untrained"],
        "val": REPORT["val"]["trained"],
    }


def test_every_section_prefix_is_told_apart_from_the_others():
    for section, prefix in SECTIONS.items():
        assert from_mlflow({mlflow_key(prefix + "m@1"): 1.0}) == {section: {"m@1": 1.0}}
    assert metric_name(mlflow_key("a_R@5")) == "a_R@5"


def test_names_for_tables():
    assert flat_name("trained", "negation_accuracy") == "negation_accuracy"
    assert flat_name("analysis", "inter_prompt_cosine") == "analysis.inter_prompt_cosine"
    assert short_name("text_to_image_R@5") == "t→i R@5" and short_name("val.image_to_text_R@1") == "val.i→t R@1"


def test_the_training_summary_round_trips_through_its_file(tmp_path):
    from mpe.files.atomic import write_json
    from mpe.records import TRAIN, metrics_file

    s = TrainingSummary(
        steps=6,
        total_steps=6,
        train_samples=96,
        ray_run_name="r-1",
        mlflow_run_id="abc",
        model_uri="models:/m/1",
        seconds={"total": 1.0},
    )
    write_json(metrics_file(tmp_path, TRAIN), {**s.to_json(), "a_field_of_a_later_version": 1})
    assert TrainingSummary.read(tmp_path) == s and training_run_id(tmp_path) == "abc"
    assert TrainingSummary.read(tmp_path / "none") is None and training_run_id(tmp_path / "none") is None
