"""The experiment-suite flow: every (cell, seed) of a suite as a real pipeline run — data, base model,
cache, train, evaluate (and reweighting for the analysed cells) — by calling the stage functions
directly, each run an MLflow child of one parent run per suite and form.

Why not ``dvc exp run --queue``: DVC experiments run each one in its own copy of the workspace, so
every cell would re-create the data and re-check the caches; here cells share one world per data
config, one base model per APT count and one content-addressed cache root, on a 2-core machine one
after another. Finished runs (metrics written, MLflow run present) are skipped, so a stopped suite
resumes.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from mpe.runtime.telemetry import disable_telemetry

disable_telemetry()

from prefect import flow, get_run_logger, task  # noqa: E402

from mpe.config import load_params  # noqa: E402
from mpe.evaluation.experiments.suite import RunSpec, expand, load_suite, suite_path  # noqa: E402
from mpe.files import storage  # noqa: E402
from mpe.records import EVAL, read_metrics  # noqa: E402
from mpe.runtime.prefect_server import one_line_user_errors  # noqa: E402
from mpe.runtime.project_lock import project_lock  # noqa: E402
from mpe.stages import base_model, cache, data, evaluate, reweight, train  # noqa: E402
from mpe.tracking.runs import parent_run  # noqa: E402
from mpe.tracking.settings import resolve_tracking_uri, tracking_settings  # noqa: E402

one_line_user_errors()  # a Ctrl-C or bad input ends in its one line, not a traceback


def _done(spec: RunSpec) -> bool:
    return read_metrics(spec.params.metrics_dir, EVAL) is not None


@task(name="suite-data", task_run_name="data {out}")
def prepare_data(spec: RunSpec, out: str) -> None:
    if not storage.exists(storage.join(out, "stats.json")):
        data.run(spec.data_params)


@task(name="suite-base-model", task_run_name="base model {out}")
def prepare_base(spec: RunSpec, out: str) -> None:
    if not (Path(out) / "config.json").exists():
        base_model.run(spec.params)


@task(name="suite-cell", task_run_name="{spec.cell} seed {spec.seed}")
def run_cell(spec: RunSpec, analyse: bool) -> dict:
    log = get_run_logger()
    cache.run(spec.params)
    summary = train.run(spec.params)
    report = evaluate.run(spec.params)
    if analyse and spec.params.model.text.num_prompts > 1 and "val" in spec.params.evaluate.splits:
        reweight.run(spec.params)
    log.info(
        "%s seed %s: t2i R@5 %.3f, i2t R@5 %.3f (%s steps)",
        spec.cell,
        spec.seed,
        report["trained"]["text_to_image_R@5"],
        report["trained"]["image_to_text_R@5"],
        summary["steps"],
    )
    return report["trained"]


@flow(name="experiment-suite", log_prints=True)
def experiment_suite(name: str, form: str = "quick", project_dir: str = ".", only: list[str] | None = None) -> dict:
    """Run every (cell, seed) of ``experiments/<name>.yaml`` in ``form``; ``only`` limits the cells."""
    project = Path(project_dir).resolve()
    os.chdir(project)
    with project_lock(project, wait=None, say=get_run_logger().info):  # one suite or run per project at a time
        suite = load_suite(suite_path(name, project))
        base = resolve_tracking_uri(load_params(project / suite.base))
        parent = parent_run(
            tracking_settings(base.mlflow),
            f"{name} ({form})",
            {"mpe.suite": name, "mpe.form": form, "mpe.suite_parent": "true"},
        )
        specs = [
            replace(s, params=resolve_tracking_uri(s.params))
            for s in expand(suite, form, project, parent)
            if not only or s.cell in only
        ]
        for out, spec in {s.params.data.out_dir: s for s in specs}.items():
            prepare_data(spec, out)
        for out, spec in {s.params.base_model.out_dir: s for s in specs}.items():
            prepare_base(spec, out)
        results = {}
        for spec in specs:
            if _done(spec):
                continue
            results[f"{spec.cell}/{spec.seed}"] = run_cell(spec, spec.cell in suite.analyse)
        return {"suite": name, "form": form, "parent_run_id": parent, "ran": len(results), "runs": len(specs)}
