"""Suites as data: what a row implies, errors that name the cell and key, the paired table against a
brute-force computation, and the aspect-weight search."""

import statistics

import pytest
import torch
import torch.nn.functional as F
import yaml

from mpe.errors import ConfigError
from mpe.evaluation.experiments.report import CellResult, _prompt_matrix, comparison_rows, table_rows
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


def test_comparison_of_two_cells_is_the_per_seed_difference_and_its_sign_agreement():
    a = CellResult("a", {0: {"m": 0.5, "n": 0.1}, 1: {"m": 0.7}, 2: {"m": 0.4, "n": 0.3}})
    b = CellResult("b", {0: {"m": 0.4, "n": 0.2}, 1: {"m": 0.6}, 3: {"m": 0.9}})  # seed 3 has no pair
    (row,) = comparison_rows({"a": a, "b": b}, [("a", "b")], ["m", "n"])
    diffs = [0.5 - 0.4, 0.7 - 0.6]
    assert row["cell"] == "a − b" and row["seeds"] == 2
    assert row["m"]["mean"] == pytest.approx(statistics.fmean(diffs))
    assert row["m"]["std"] == pytest.approx(statistics.stdev(diffs))
    assert (row["m"]["agree"], row["m"]["n"]) == (2, 2)
    assert row["n"]["mean"] == pytest.approx(-0.1) and (row["n"]["agree"], row["n"]["n"]) == (1, 1)
    assert comparison_rows({"a": a}, [("a", "b")], ["m"]) == []  # a cell not run yet: no row


def test_prompt_matrix_lays_out_each_prompts_accuracy_per_aspect_and_category():
    seeds = {
        s: {
            "analysis.aspect_shape_full": 0.6 + s / 10,
            "analysis.aspect_shape_prompt_1": 0.9,
            "analysis.aspect_shape_prompt_2": 0.5 + s / 10,
            "shapes_sugarcrepe.swap_att": 0.7,
            "analysis.shapes_sugarcrepe.swap_att_prompt_1": 0.6,
            "analysis.shapes_sugarcrepe.swap_att_prompt_2": 0.8,
        }
        for s in (0, 2)
    }
    lines = _prompt_matrix(CellResult("c", seeds))
    assert lines[0].startswith("| aspect / category | full | prompt 1 | prompt 2 |")
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[2:]}
    assert rows["aspect shape"] == "| aspect shape | 0.700 | 0.900 | 0.600 | 0.300 |"
    assert rows["shapes_sugarcrepe.swap_att"] == "| shapes_sugarcrepe.swap_att | 0.700 | 0.600 | 0.800 | 0.200 |"


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
