"""The retrain flow: the DVC stages of ``dvc.yaml`` in order, push to the DVC remote, register in MLflow.

Thin by design: every task calls ``mpe``; the logic lives in the library. Run it once with ``mpe run``
(or ``python flows/retrain.py``); serve it nightly with ``mpe schedule`` or deploy it with ``prefect
deploy`` (prefect.yaml). It is loaded by path, as Prefect loads an entrypoint: ``flows/`` is not a package.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mpe.runtime.telemetry import disable_telemetry

disable_telemetry()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from mpe.config import load_params  # noqa: E402
from mpe.errors import Interrupted  # noqa: E402
from mpe.provenance.dvc import push, repro_stage, stage_names  # noqa: E402
from mpe.provenance.run_record import record_run  # noqa: E402
from mpe.records import TRAIN, TrainingSummary, metrics_file  # noqa: E402
from mpe.runtime.prefect_server import one_line_user_errors  # noqa: E402
from mpe.runtime.project_lock import PROJECT_TAG, project_identity, project_lock  # noqa: E402
from mpe.stages import register as register_stage  # noqa: E402
from mpe.stages import search_index as search_index_stage  # noqa: E402
from mpe.tracking.runs import fail_abandoned_runs, run_exists  # noqa: E402
from mpe.tracking.settings import resolve_tracking_uri, tracking_settings  # noqa: E402

one_line_user_errors()  # a Ctrl-C or bad input ends in its one line, not a traceback

# Retries where a retry can help: downloads (network), the resumable cache, Ray training (resumes
# from its last checkpoint). Deterministic stages fail the same way twice; a Ctrl-C is never retried.
RETRIES = {"data": 2, "cache": 1, "train": 1}


def _unless_interrupted(task, task_run, state) -> bool:
    try:
        state.result()
    except Interrupted:
        return False
    except Exception:
        return True
    return True


@task(name="dvc-stage", task_run_name="dvc repro {stage}")
def dvc_stage(stage: str, project_dir: str, force: bool = False) -> None:
    repro_stage(stage, Path(project_dir), get_run_logger().info, force)


@task(name="dvc-push", retries=2, retry_delay_seconds=10)
def dvc_push(project_dir: str, remote: str) -> None:
    push(Path(project_dir), remote, get_run_logger().info)


@task(name="record-run")
def record(project_dir: str) -> dict | None:
    """The run's lock and params, committed on the branch mpe/runs (none outside git: artifacts only)."""
    rec = record_run(Path(project_dir), str(flow_run.id) if flow_run.id else "local")
    if rec is None:
        get_run_logger().info(
            "%s is not a git repository: the run's dvc.lock and params are kept as MLflow artifacts only", project_dir
        )
    else:
        get_run_logger().info(
            "recorded this run's dvc.lock and params as %s on branch %s", rec["commit"][:12], rec["ref"]
        )
    return rec


@task(name="register")
def register(params_path: str, project_dir: str, rec: dict | None) -> dict:
    params = resolve_tracking_uri(load_params(Path(project_dir) / params_path))
    result = register_stage.run(
        params, Path(project_dir), flow_run_id=str(flow_run.id) if flow_run.id else None, record=rec
    )
    get_run_logger().info(
        "registered %s version %s as @%s: %s",
        result["model_name"],
        result["version"],
        result["alias"],
        result["reason"],
    )
    return result


@task(name="search-index")
def search_index(params_path: str, project_dir: str, registered: dict) -> dict:
    """The registered model's search index, logged with its version (kept when the model did not change)."""
    params = resolve_tracking_uri(load_params(Path(project_dir) / params_path))
    meta = search_index_stage.run(params, registered=registered)
    get_run_logger().info(
        "%s the search index of %s images (%s) for %s version %s: %s",
        "built" if meta["built"] else "kept",
        meta["count"],
        meta["index_key"],
        registered["model_name"],
        registered["version"],
        meta.get("logged", meta["out_dir"]),
    )
    return meta


@flow(name="retrain", log_prints=True)
def retrain(params_path: str = "params.yaml", project_dir: str = ".") -> dict:
    """The stages of dvc.yaml (each rerun only if its deps changed), push, record the run's lock on the
    branch mpe/runs, register, and the registered model's search index — one run per project at a time (a
    second one waits for the first)."""
    project_dir = str(Path(project_dir).resolve())
    os.chdir(project_dir)  # stages read params.yaml and write outputs relative to the project
    logger = get_run_logger()
    with project_lock(project_dir, wait=None, say=logger.info):
        params = resolve_tracking_uri(load_params(Path(project_dir) / params_path))
        settings = tracking_settings(params.mlflow)
        for run_id in fail_abandoned_runs(settings, {PROJECT_TAG: project_identity(project_dir)}):
            logger.warning("MLflow run %s of this project was left running by a killed run: marked FAILED", run_id)
        forced = set()
        trained = TrainingSummary.read(params.metrics_dir)
        if trained is not None and trained.mlflow_run_id and not run_exists(settings, trained.mlflow_run_id):
            logger.warning(
                "%s names MLflow run %s, which %s does not hold (an emptied or another store): train runs again "
                "(it resumes its finished Ray run) to log the training there",
                metrics_file(params.metrics_dir, TRAIN),
                trained.mlflow_run_id,
                settings.tracking_uri,
            )
            forced.add("train")
        for stage in stage_names(Path(project_dir)):
            dvc_stage.with_options(
                retries=RETRIES.get(stage, 0), retry_delay_seconds=5, retry_condition_fn=_unless_interrupted
            )(stage, project_dir, stage in forced)
        if params.dvc.push:
            dvc_push(project_dir, params.dvc.remote)
        registered = register(params_path, project_dir, record(project_dir))
        search_index(params_path, project_dir, registered)
        return registered


if __name__ == "__main__":
    result = retrain(params_path=sys.argv[1] if len(sys.argv) > 1 else "params.yaml")
    print(result)
