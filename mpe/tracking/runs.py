"""MLflow runs: the tracking store (checked before use) and experiment, starting or resuming a run, logging
params, metrics and files, a suite's parent run, runs a killed process left RUNNING, and a stage's run
that the store does not hold. (The trained model as an MLflow model: ``mpe.serving.mlflow_model``.)"""

from __future__ import annotations

import logging
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from mpe.errors import StageInputError, TrackingError
from mpe.records import mlflow_key
from mpe.tracking.settings import TrackingSettings, is_server

log = logging.getLogger(__name__)
_checked: set[str] = set()
SERVER_TIMEOUT_S = 15


def _sqlite_file(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def _check_sqlite(path: Path) -> None:
    import sqlite3

    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            verdict = con.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError as err:
        if "locked" in str(err):  # another process writes to it: it opens, it is not damaged
            return
        verdict = str(err)
    except sqlite3.DatabaseError as err:
        verdict = str(err)
    if verdict != "ok":
        raise TrackingError(
            f"{path}: the MLflow store is not a readable SQLite database ({verdict}); restore it from a "
            "backup, or move it away to start a new store (the next `mpe run` logs the finished training there)"
        )


def _check_server(uri: str) -> None:
    """One query that needs the server's database, with a short timeout and no retries (MLflow's client
    retries a failing server for minutes, in silence)."""
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
    host = urllib.parse.urlsplit(uri).hostname or ""
    handlers = [urllib.request.ProxyHandler({})] if host in ("127.0.0.1", "localhost", "::1") else []
    try:
        with urllib.request.build_opener(*handlers).open(url, timeout=SERVER_TIMEOUT_S):
            return
    except urllib.error.HTTPError as err:
        if (
            err.code < 500
        ):  # 404: no such experiment (the database answered); 401/403: MLflow's client has the credentials
            return
        why = f"it answered HTTP {err.code} to a query (its database may be down)"
    except (urllib.error.URLError, OSError) as err:
        why = f"no answer within {SERVER_TIMEOUT_S} s ({getattr(err, 'reason', err)})"
    raise TrackingError(
        f"{uri}: the MLflow tracking server cannot be used: {why}; check it (`mpe tracking-server status`, "
        "`mpe tracking-server start` restarts a local one) or point mlflow.tracking_uri elsewhere"
    )


def check_store(uri: str) -> None:
    """One line, before MLflow's own retries and tracebacks, when the store cannot be used: a SQLite file that
    is not a readable database, a server that does not answer a query. An empty (0 byte) SQLite file is said
    aloud: MLflow makes a new, empty store of it. Once per process and store."""
    if uri in _checked:
        return
    path = _sqlite_file(uri)
    if path is not None and path.is_file():
        if path.stat().st_size == 0:
            log.warning(
                "%s: the MLflow store is empty (0 bytes): MLflow starts a new store in it, and the runs and "
                "registered models it held are gone; a stage whose MLflow run it lacks logs it anew",
                path,
            )
        else:
            _check_sqlite(path)
    elif is_server(uri):
        _check_server(uri)
    _checked.add(uri)


def use(settings: TrackingSettings):
    """Point MLflow at the store (checked first) and make sure the experiment exists (with our artifact
    location)."""
    import mlflow

    check_store(settings.tracking_uri)
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


def run_exists(settings: TrackingSettings, run_id: str) -> bool:
    """Whether the store holds run ``run_id`` (a new or emptied store does not hold an earlier one's)."""
    import mlflow

    check_store(settings.tracking_uri)
    try:
        mlflow.MlflowClient(settings.tracking_uri).get_run(run_id)
        return True
    except mlflow.exceptions.MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


PREVIOUS_RUN_TAG = "mpe.previous_run_id"  # the run, in another or an emptied store, that a new one replaces


def start_run(
    settings: TrackingSettings, run_id: str | None, run_name: str, params: dict | None = None, tags: dict | None = None
) -> str:
    """Resume ``run_id``, or start a run named ``run_name`` with ``params`` and ``tags``; returns its id. A
    ``run_id`` the store does not hold (it was emptied, or the project now tracks to another one) gets a new
    run, tagged with the old id."""
    import mlflow

    use(settings)
    if run_id and run_exists(settings, run_id):
        mlflow.start_run(run_id=run_id)
        return run_id
    run = mlflow.start_run(run_name=run_name)
    if params:
        mlflow.log_params(flatten(params))
    mlflow.set_tags({**(tags or {}), **({PREVIOUS_RUN_TAG: run_id} if run_id else {})})
    return run.info.run_id


def require_run(settings: TrackingSettings, run_id: str | None, recorded_in: str | Path) -> None:
    """One line when the MLflow run a stage wrote into ``recorded_in`` is not in the store it tracks to now."""
    if run_id and not run_exists(settings, run_id):
        raise StageInputError(
            f"{recorded_in}: names MLflow run {run_id}, which {settings.tracking_uri} does not hold (the store "
            "was emptied or replaced, or mlflow.tracking_uri changed); rerun `mpe train` (it resumes the "
            "finished training and logs it as a new run there), or `mpe run`"
        )


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

    check_store(settings.tracking_uri)
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
