"""params.yaml validation: the shipped file loads, and errors name the file and the key."""

from pathlib import Path

import pytest

from mpe.config import ConfigError, ModelConfig, load_params, validate

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_params_load():
    p = load_params(ROOT / "params.yaml")
    assert p.model.text.pooling == "multi_prompt" and p.model.embed_dim % p.model.text.num_prompts == 0


@pytest.mark.parametrize(
    "text,key",
    [
        ("model:\n  text:\n    num_prompts: zero\n", "model.text.num_prompts"),
        ("model:\n  vision:\n    patch: 8\n", "model.vision.patch"),
        ("base_model:\n  name: 3\n", "base_model.name"),
        ("model:\n  loss:\n    kind: triplet\n", "model.loss.kind"),
        ("train:\n  storage_path: s3://bucket/ray_results\n", "train.storage_path"),  # a shared folder, not a URL
        ("train:\n  epochs: .inf\n", "train.epochs"),  # trained for ever
        ("train:\n  lr: .nan\n", "train.lr"),  # NaN weights from step 1
        ("model:\n  loss:\n    lambda_div: .inf\n", "model.loss.lambda_div"),
        ("ray:\n  num_cpus: 0\n", "ray.num_cpus"),
        ("train:\n  num_workers: 3\n", "train.num_workers (3) needs a CPU each"),  # Ray Train waited for ever
        ("metrics_dir: ''\n", "metrics_dir"),
    ],
)
def test_errors_name_the_key(tmp_path, text, key):
    f = tmp_path / "params.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_params(f)
    assert key in str(err.value) and str(f) in str(err.value)


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="divisible"):
        validate(ModelConfig, {"embed_dim": 250, "text": {"num_prompts": 4}}, "x")
    with pytest.raises(ConfigError, match="negation needs pooling"):
        validate(ModelConfig, {"text": {"pooling": "mean", "num_prompts": 1}}, "x")
    with pytest.raises(ConfigError, match="placeholder"):
        validate(ModelConfig, {"text": {"prompt_template": "no token here"}}, "x")
    assert validate(ModelConfig, {"loss": {"kind": "siglip"}}, "x").loss.initial_logit_scale == 10.0


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
