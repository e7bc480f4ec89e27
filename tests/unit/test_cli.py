"""``mpe model init`` and ``mpe embed`` end to end on a tiny local base model."""

import copy

import numpy as np
import pytest
from PIL import Image

from mpe.cli import main
from tests.conftest import tiny_lm

PARAMS = """
model:
  embed_dim: 48
  text: {num_prompts: 3}
  vision: {image_size: 32, patch_size: 8, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}
"""


@pytest.fixture()
def tiny_base(tokenizer, tmp_path):
    tok = copy.deepcopy(tokenizer)
    lm = tiny_lm("llama", tok)
    out = tmp_path / "tiny-base"
    lm.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_model_init_then_embed_text_and_images(tiny_base, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS)
    model = tmp_path / "model"
    assert (
        main(
            [
                "--params",
                str(params),
                "model",
                "init",
                "--base",
                str(tiny_base),
                "--out",
                str(model),
                "--num-prompts",
                "4",
            ]
        )
        == 0
    )
    assert "K=4" in capsys.readouterr().out
    texts = tmp_path / "t.txt"
    texts.write_text("a red circle\n\na blue square\n")
    assert main(["embed", "--model", str(model), "--text-file", str(texts), "--out", str(tmp_path / "t.npy")]) == 0
    assert "skipped 1 blank lines (2)" in capsys.readouterr().out
    t = np.load(tmp_path / "t.npy")
    assert t.shape == (2, 48) and np.allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (80 * i, 0, 0)).save(imgs / f"{i}.png")
    assert main(["embed", "--model", str(model), "--image-dir", str(imgs), "--out", str(tmp_path / "v.npy")]) == 0
    assert np.load(tmp_path / "v.npy").shape == (3, 48)
    (imgs / "3.jpg").write_bytes(b"not an image")
    assert main(["embed", "--model", str(model), "--image-dir", str(imgs), "--out", str(tmp_path / "w.npy")]) == 2
    assert "3.jpg: not a readable image" in capsys.readouterr().err
    assert not (tmp_path / "w.npy").exists()


def test_bad_params_name_the_key(tiny_base, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("model:\n  embed_dim: 50\n  text: {num_prompts: 4, poolng: mean}\n")
    assert main(["--params", str(params), "model", "init", "--base", str(tiny_base), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "model.text.poolng" in err and str(params) in err


def test_a_missing_params_file_is_an_error_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--params", "nope.yaml", "train"]) == 2
    err = capsys.readouterr().err
    assert "nope.yaml: params file not found" in err
    assert main(["cache"]) == 2  # no params.yaml here either
    assert "params.yaml: params file not found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_run_refuses_a_params_file_dvc_does_not_read(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    (tmp_path / "other.yaml").write_text("seed: 1\n")
    assert main(["--params", "other.yaml", "run"]) == 2
    err = capsys.readouterr().err
    assert "other.yaml" in err and "cp other.yaml params.yaml" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.yaml", "params.yaml"]


def _show(argv, capsys) -> dict:
    import yaml

    assert main(argv) == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def test_params_and_overrides_are_the_same_before_or_after_the_command(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text("train: {lr: 0.001}\nevaluate: {ks: [1, 5]}\n")
    after = _show(["params", "show", "--params", "p.yaml", "--set", "train.lr=0.002", "--set", "seed=3"], capsys)
    before = _show(["--params", "p.yaml", "--set", "train.lr=0.002", "params", "show", "--set", "seed=3"], capsys)
    assert after == before
    assert (after["train"]["lr"], after["seed"], after["evaluate"]["ks"]) == (0.002, 3, [1, 5])


@pytest.mark.parametrize(
    "override,named",
    [
        ("train.lr=fast", "train.lr"),  # typed like the file
        ("train.no_such_key=1", "train.no_such_key"),  # unknown keys refused by name
        ("evaluate.ks=[0, 5]", "evaluate.ks"),  # validated like the file
        ("train.lr", "key.path=value"),  # not an assignment
        ("seed.deeper=1", "seed is a value"),  # a value is not a section
    ],
)
def test_a_bad_override_is_one_line_naming_the_key(tmp_path, capsys, monkeypatch, override, named):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    assert main(["params", "show", "--set", override]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def test_the_tracking_uri_is_the_option_then_mlflow_s_variable_then_params(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("mlflow: {tracking_uri: 'sqlite:///from-params.db'}\n")
    assert _show(["params", "show"], capsys)["mlflow"]["tracking_uri"] == "sqlite:///from-params.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert _show(["params", "show"], capsys)["mlflow"]["tracking_uri"] == "http://127.0.0.1:5999"
    shown = _show(["params", "show", "--tracking-uri", "sqlite:///from-option.db"], capsys)
    assert shown["mlflow"]["tracking_uri"] == "sqlite:///from-option.db"


def test_a_broken_params_file_does_not_break_commands_that_do_not_read_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("model: [not, a, mapping\n")
    with pytest.raises(SystemExit) as exit_:  # exit 3: "not running"; the params were never read
        main(["tracking-server", "status", "--dir", str(tmp_path / "none")])
    assert exit_.value.code == 3 and "not running" in capsys.readouterr().out
    assert (
        main(
            [
                "embed",
                "--model",
                str(tmp_path / "no-model"),
                "--text-file",
                str(tmp_path / "none.txt"),
                "--out",
                str(tmp_path / "e.npy"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "none.txt" in err and "params.yaml" not in err
    assert main(["params", "show"]) == 2 and "params.yaml: not valid YAML" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [("", "empty"), (b"\xff\xfe\x00binary", "not a UTF-8 text file")])
def test_an_empty_or_binary_params_file_is_named(tmp_path, capsys, monkeypatch, content, message):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "params.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["params", "show"]) == 2
    err = capsys.readouterr().err
    assert "params.yaml" in err and message in err


@pytest.mark.parametrize("argv", [["run", "--wait", "-3"], ["compare", "--last", "-5"], ["compare", "--last", "0"]])
def test_negative_counts_and_waits_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "must be > 0" in capsys.readouterr().err


def test_version():
    from mpe import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and __version__
