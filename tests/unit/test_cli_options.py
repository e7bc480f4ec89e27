"""``--set`` against a params file holding the same value (``mpe train --params p.yaml --set train.lr=0.002``
is ``mpe --params p2.yaml train`` where p2 says so), typed values, and the overrides ``mpe run`` writes into
``params.yaml`` keeping its comments (as ``dvc exp run -S`` does). Position, bad keys and ``--version``:
``tests/unit/test_cli.py``."""

from __future__ import annotations

import pytest
import yaml

from mpe.cli import _merge_common, build_parser, main
from mpe.config import Params, load_params, write_overrides

BASE = """\
# a comment DVC users keep
seed: 3
train:
  lr: 0.001   # the peak learning rate
  epochs: 8
evaluate:
  ks: [1, 5]
"""


def _show(capsys, *argv) -> dict:
    assert main(list(argv)) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.fixture()
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text(BASE)
    (tmp_path / "p2.yaml").write_text(BASE.replace("lr: 0.001", "lr: 0.002"))
    return tmp_path


def test_params_and_set_after_the_command_parse_as_they_do_before_it():
    parser = build_parser()
    after = parser.parse_args(["train", "--params", "p.yaml", "--set", "train.lr=0.002", "--set", "seed=1"])
    before = parser.parse_args(["--params", "p.yaml", "--set", "train.lr=0.002", "--set", "seed=1", "train"])
    for args in (after, before):
        _merge_common(args)
    assert (after.params, after.set, after.func) == (before.params, before.set, before.func)
    assert after.set == ["train.lr=0.002", "seed=1"]


def test_set_after_the_command_gives_the_params_of_a_file_holding_that_value(files, capsys):
    overridden = _show(capsys, "params", "show", "--params", "p.yaml", "--set", "train.lr=0.002")
    from_file = _show(capsys, "--params", "p2.yaml", "params", "show")
    assert overridden == from_file
    assert overridden["train"]["lr"] == 0.002 and overridden["seed"] == 3
    # every key of the typed config is shown, defaults included, under its params.yaml name
    assert set(overridden) == set(Params().model_dump(by_alias=True))
    assert overridden == Params.model_validate(yaml.safe_load(BASE.replace("0.001", "0.002"))).model_dump(
        mode="json", by_alias=True
    )


def test_set_values_are_read_as_yaml_and_validated_like_the_file(files, capsys):
    shown = _show(
        capsys,
        "--params",
        "p.yaml",
        "params",
        "show",
        "--set",
        "evaluate.ks=[1, 10]",
        "--set",
        "train.max_steps=null",
        "--set",
        "cache.enabled=false",
        "--set",
        "data.filters.min_similarity=0.28",
    )
    assert shown["evaluate"]["ks"] == [1, 10] and shown["train"]["max_steps"] is None
    assert shown["cache"]["enabled"] is False and shown["data"]["filters"]["min_similarity"] == 0.28


def test_overrides_written_into_params_yaml_keep_its_comments_and_order(files):
    said = write_overrides("p.yaml", ["train.lr=0.002", "train.max_steps=10"])
    text = (files / "p.yaml").read_text()
    assert "# a comment DVC users keep" in text and "# the peak learning rate" in text
    assert text.index("seed:") < text.index("train:") < text.index("evaluate:")
    params = load_params(files / "p.yaml")
    assert params.train.lr == 0.002 and params.train.max_steps == 10 and params.train.epochs == 8
    assert said == ["p.yaml: train.lr: 0.001 -> 0.002", "p.yaml: train.max_steps: (unset) -> 10"]


def test_an_invalid_override_leaves_params_yaml_untouched(files):
    from mpe.errors import ConfigError

    with pytest.raises(ConfigError, match="train.epochs"):
        write_overrides(files / "p.yaml", ["train.epochs=0"])
    assert (files / "p.yaml").read_text() == BASE
