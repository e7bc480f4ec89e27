"""An experiment suite for real: two cells, one seed, a few steps, through the CLI (a Prefect flow calling
the stage functions), the runs nested under one MLflow parent, the report and the terminal table read
back from MLflow alone, and a rerun that skips what is done."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from mpe.runtime.ray_cluster import LOOPBACK_ENV
from tests.project_config import small_params

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
SUITE = {
    "name": "tiny",
    "seeds": [0],
    "baseline": "llm_mean",
    "metrics": ["text_to_image_R@1", "image_to_text_R@5", "val.text_to_image_R@5"],
    "tables": {"The world's sets": ["shapes_sugarcrepe.swap_att", "shapes_winoground.group_score"]},
    "comparisons": [["multi_prompt_k2", "llm_mean"]],
    "common": {
        "data": {"shapes": {"val_captions": 12, "aspect_probes": 4, "benchmark_items": 3}},
        "evaluate": {"splits": ["val", "test"], "compare_untrained": False},
    },
    "forms": {"quick": {"train": {"max_steps": 3, "checkpoint_every": 3}}},
    "cells": {"llm_mean": {"model": {"text": {"pooling": "mean"}}}, "multi_prompt_k2": {}},
    "analyse": ["multi_prompt_k2"],
}


@pytest.fixture(scope="module")
def suite_project(tmp_path_factory, tiny_base_dir):
    root = tmp_path_factory.mktemp("suite")
    params = small_params(Path("."), tiny_base_dir)
    for section in ("data", "cache", "train", "evaluate"):
        params[section] = {
            k: v for k, v in params[section].items() if k not in ("out_dir", "root", "storage_path", "plots_dir")
        }
    params["mlflow"] = {"tracking_uri": "sqlite:///mlruns.db", "artifact_root": "mlartifacts"}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(REPO / "flows", root / "flows")  # a project's flows, loaded by path as Prefect loads them
    (root / "experiments").mkdir()
    (root / "experiments" / "tiny.yaml").write_text(yaml.safe_dump(SUITE))
    env = {**os.environ, "PREFECT_HOME": str(root / ".prefect"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PREFECT_API_URL", None)
    env.pop(LOOPBACK_ENV, None)  # as a user's shell has it: the command itself keeps Ray on loopback
    out = subprocess.run(
        [str(BIN / "mpe"), "experiments", "run", "tiny"], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root, env, out.stdout + out.stderr


def test_the_suite_s_ray_cluster_stays_on_loopback(suite_project):
    """Ray Train names each worker's node address when it starts the group: every one is 127.0.0.1 (Ray binds a
    local cluster to the machine's own address unless told before it is imported)."""
    *_, output = suite_project
    addresses = re.findall(r"\(ip=([0-9a-f.:]+), pid=", output)
    assert addresses and set(addresses) == {"127.0.0.1"}, sorted(set(addresses))


def _runs(root):
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlruns.db'}")
    exp = mlflow.get_experiment_by_name("mpe")
    return mlflow.search_runs([exp.experiment_id], output_format="list")


def test_every_cell_is_a_child_run_of_one_parent(suite_project):
    root, *_ = suite_project
    runs = _runs(root)
    parents = [r for r in runs if r.data.tags.get("mpe.suite_parent") == "true"]
    children = [r for r in runs if r.data.tags.get("mpe.cell")]
    assert len(parents) == 1 and sorted(r.data.tags["mpe.cell"] for r in children) == ["llm_mean", "multi_prompt_k2"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    k2 = next(r for r in children if r.data.tags["mpe.cell"] == "multi_prompt_k2").data
    assert k2.params["model.text.num_prompts"] == "2" and "eval_val.text_to_image_R_at_5" in k2.metrics
    assert "eval_analysis.aspect_colour_prompt_2" in k2.metrics and "eval_reweight.test_gain" in k2.metrics
    assert "eval.shapes_sugarcrepe.swap_att" in k2.metrics and "eval_analysis.probe_shape" in k2.metrics
    mean = next(r for r in children if r.data.tags["mpe.cell"] == "llm_mean").data
    assert mean.params["model.text.num_prompts"] == "1" and mean.params["model.text.negation"] == "False"


def test_report_and_compare_come_from_mlflow(suite_project):
    root, env, _ = suite_project
    out = subprocess.run(
        [str(BIN / "mpe"), "experiments", "report", "tiny"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = (root / "docs" / "RESULTS.md").read_text()
    assert "`mpe experiments report tiny --form quick`" in text and "commit" in text and "cores" in text
    main_table = text.split("\n### ")[0]  # the suite's metrics, before the extra tables
    rows = [line for line in main_table.splitlines() if line.startswith(("| llm_mean", "| multi_prompt"))]
    assert len(rows) == 2 and "/1)" in rows[1]  # the paired difference and its seed count
    assert "### The world's sets" in text and "| multi_prompt_k2 − llm_mean | 1 |" in text
    assert "What each prompt's segment alone tells apart" in text and "| shapes_sugarcrepe.swap_att |" in text
    assert (root / "docs" / "results_tiny_quick.png").stat().st_size > 0
    table = subprocess.run(
        [str(BIN / "mpe"), "compare", "--suite", "tiny"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert table.returncode == 0 and "multi_prompt_k2" in table.stdout and "t→i R@1" in table.stdout


def test_a_rerun_skips_finished_runs(suite_project):
    root, env, _ = suite_project
    before = {p: p.stat().st_mtime_ns for p in root.rglob("eval.json")}
    out = subprocess.run(
        [str(BIN / "mpe"), "experiments", "run", "tiny"], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0 and "'ran': 0" in out.stdout, out.stdout[-2000:]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert json.loads(next(root.rglob("multi_prompt_k2/seed0/metrics/reweight.json")).read_text())["weights"]
