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
