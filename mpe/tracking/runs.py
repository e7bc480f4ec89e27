"""MLflow runs: the tracking store and experiment, starting or resuming a run, logging params, metrics and
files, a suite's parent run, and runs a killed process left RUNNING. (The trained model as an MLflow
model: ``mpe.serving.mlflow_model``.)"""

from __future__ import annotations

from pathlib import Path

from mpe.records import mlflow_key
from mpe.tracking.settings import TrackingSettings


def use(settings: TrackingSettings):
    """Point MLflow at the store and make sure the experiment exists (with our artifact location)."""
    import mlflow

    mlflow.set_tracking_uri(settings.tracking_uri)
    if mlflow.get_experiment_by_name(settings.experiment) is None:
        mlflow.create_experiment(settings.experiment, artifact_location=settings.artifact_location)
    mlflow.set_experiment(settings.experiment)
    return mlflow.MlflowClient()


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """``section.key: value`` for every leaf (what MLflow shows and compares)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = str(v)[:500]
    return out


def start_run(
    settings: TrackingSettings, run_id: str | None, run_name: str, params: dict | None = None, tags: dict | None = None
) -> str:
    """Resume ``run_id``, or start a run named ``run_name`` with ``params`` and ``tags``; returns its id."""
    import mlflow

    use(settings)
    if run_id:
        mlflow.start_run(run_id=run_id)
        return run_id
    run = mlflow.start_run(run_name=run_name)
    if params:
        mlflow.log_params(flatten(params))
    if tags:
        mlflow.set_tags(tags)
    return run.info.run_id


def end_run(status: str = "FINISHED") -> None:
    import mlflow

    mlflow.end_run(status)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log to the active run, names through :func:`mlflow_key`."""
    import mlflow

    mlflow.log_metrics({mlflow_key(k): v for k, v in metrics.items()}, step=step)


def log_to_run(
    settings: TrackingSettings,
    run_id: str,
    metrics: dict[str, float] | None = None,
    artifacts: list[Path] = (),
    artifact_path: str = "plots",
) -> None:
    """Add metrics and files to a finished run (evaluation into the training run, say)."""
    import mlflow

    use(settings)
    with mlflow.start_run(run_id=run_id):
        if metrics:
            log_metrics(metrics)
        for f in artifacts:
            mlflow.log_artifact(str(f), artifact_path=artifact_path)


def parent_run(settings: TrackingSettings, name: str, tags: dict[str, str]) -> str:
    """The run with exactly these tags (created if there is none): the parent a suite's runs nest under."""
    import mlflow

    client = use(settings)
    exp = mlflow.get_experiment_by_name(settings.experiment)
    found = mlflow.search_runs(
        [exp.experiment_id],
        output_format="list",
        filter_string=" and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items()),
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(exp.experiment_id, run_name=name, tags=tags)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def fail_abandoned_runs(settings: TrackingSettings, tags: dict[str, str]) -> list[str]:
    """Mark FAILED (with tag ``mpe.end_reason``) every run still RUNNING that carries ``tags``; their ids.

    Call it only while holding the project's run lock: then no live run of the project exists, and a
    run MLflow still shows as running belonged to a run that was killed (``kill -9``, a lost machine).
    """
    import mlflow

    client = mlflow.MlflowClient(settings.tracking_uri)
    exp = client.get_experiment_by_name(settings.experiment)
    if exp is None:
        return []
    where = " and ".join([f"tags.`{k}` = '{v}'" for k, v in tags.items()] + ["attributes.status = 'RUNNING'"])
    found = client.search_runs([exp.experiment_id], filter_string=where)
    for run in found:
        client.set_tag(run.info.run_id, "mpe.end_reason", "its process was killed; marked failed by the next run")
        client.set_terminated(run.info.run_id, status="FAILED")
    return [r.info.run_id for r in found]
