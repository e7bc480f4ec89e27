"""Suites as data: what a row implies, errors that name the cell and key, the paired table against a
brute-force computation, and the aspect-weight search."""

import statistics

import pytest
import torch
import torch.nn.functional as F
import yaml

from mpe.errors import ConfigError
from mpe.evaluation.experiments.report import CellResult, table_rows
from mpe.evaluation.experiments.suite import expand, implications, load_suite
from mpe.evaluation.reweight import score_of, search
from mpe.model.multi_prompt_clip import segment_similarity


def _suite(tmp_path, cells, **extra):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": {"embed_dim": 240}}))
    (tmp_path / "experiments").mkdir(exist_ok=True)
    doc = {
        "name": "t",
        "seeds": [0, 1],
        "baseline": next(iter(cells)),
        "metrics": ["text_to_image_R@1"],
        "cells": cells,
        **extra,
    }
    (tmp_path / "experiments" / "t.yaml").write_text(yaml.safe_dump(doc))
    return load_suite(tmp_path / "experiments" / "t.yaml")


def test_a_row_sets_what_it_implies(tmp_path):
    suite = _suite(
        tmp_path,
        {
            "mean": {"model": {"text": {"pooling": "mean"}}},
            "lora": {"model": {"text": {"pooling": "mean", "tuning": "lora"}}},
            "no_neg": {"model": {"loss": {"lambda_neg": 0.0}}},
            "k6": {"model": {"text": {"num_prompts": 6}}},
            "apt": {"model": {"text": {"train_apt_embeddings": True}}},
        },
    )
    runs = {(r.cell, r.seed): r.params for r in expand(suite, "quick", tmp_path)}
    mean = runs[("mean", 0)].model.text
    assert (mean.num_prompts, mean.negation) == (1, False)
    assert runs[("lora", 1)].cache.enabled is False and runs[("lora", 1)].model.text.tuning == "lora"
    assert runs[("no_neg", 0)].model.text.negation is False and runs[("k6", 0)].model.text.negation is True
    assert runs[("apt", 0)].cache.enabled is False and runs[("k6", 0)].cache.enabled is True
    assert runs[("mean", 0)].seed == 0 and runs[("mean", 1)].seed == 1
    assert runs[("mean", 0)].data.out_dir == runs[("k6", 1)].data.out_dir  # one world for every cell
    assert runs[("mean", 0)].base_model.out_dir != runs[("k6", 0)].base_model.out_dir  # 0 vs 6 APT tokens
    assert runs[("k6", 0)].train.out_dir != runs[("k6", 1)].train.out_dir
    assert runs[("k6", 1)].mlflow.tags["mpe.cell"] == "k6" and runs[("k6", 1)].mlflow.tags["mpe.seed"] == "1"
    assert implications(
        {"model": {"text": {"pooling": "mean", "num_prompts": 1}}}, {"model": {"text": {"negation": True}}}
    ) == {"model": {"text": {"num_prompts": 1}}}


def test_errors_name_the_suite_cell_and_key(tmp_path):
    suite = _suite(tmp_path, {"ok": {}, "bad": {"model": {"text": {"poolng": "mean"}}}})
    with pytest.raises(ConfigError, match=r"t.yaml \(cell bad\): model.text.poolng"):
        expand(suite, "quick", tmp_path)
    with pytest.raises(ConfigError, match="no form 'long'"):
        expand(suite, "long", tmp_path)
    with pytest.raises(ConfigError, match="'nope' is not a cell"):
        _suite(tmp_path, {"ok": {}}, analyse=["nope"])


def test_paired_table_equals_a_brute_force_computation():
    base = CellResult("base", {0: {"m": 0.30}, 1: {"m": 0.40}, 2: {"m": 0.35}})
    other = CellResult("other", {0: {"m": 0.33}, 1: {"m": 0.39}, 2: {"m": 0.45}})
    rows = {r["cell"]: r for r in table_rows({"base": base, "other": other}, ["base", "other"], "base", ["m"])}
    e = rows["other"]["m"]
    diffs = [0.33 - 0.30, 0.39 - 0.40, 0.45 - 0.35]
    assert e["mean"] == pytest.approx(statistics.fmean([0.33, 0.39, 0.45]))
    assert e["std"] == pytest.approx(statistics.stdev([0.33, 0.39, 0.45]))
    assert e["diff"] == pytest.approx(statistics.fmean(diffs)) and e["diff_std"] == pytest.approx(
        statistics.stdev(diffs)
    )
    assert (e["agree"], e["paired"]) == (2, 3) and "diff" not in rows["base"]["m"]


def test_weight_search_finds_the_informative_segment():
    torch.manual_seed(0)
    n, k, d = 40, 2, 8
    img = F.normalize(torch.randn(n, k * d), dim=-1)
    txt = img.clone()
    txt[:, d:] = torch.randn(n, d)  # the second segment carries noise only
    txt = F.normalize(txt, dim=-1)
    pos = torch.eye(n, dtype=torch.bool)
    uniform = score_of(txt, img, pos, [1.0, 1.0])
    weights, best = search(txt, img, pos, k)
    assert weights[0] > weights[1] and best > uniform
    manual = sum(w * (txt.view(n, k, d)[:, i] @ img.view(n, k, d)[:, i].T) for i, w in enumerate(weights))
    assert torch.allclose(segment_similarity(txt, img, weights, k), manual, atol=1e-6)
