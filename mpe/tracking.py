"""MLflow, in one place: the tracking store and experiment, starting or resuming a run, logging params,
metrics, plots and the trained model as a models-from-code pyfunc."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from mpe.errors import ConfigError
from mpe.tracking_settings import TrackingSettings

PYFUNC_FILE = Path(__file__).with_name("mlflow_pyfunc.py")
PACKAGE_DIR = Path(__file__).parent
PYFUNC_REQUIREMENTS = ["torch", "transformers>=5,<6", "safetensors", "pillow", "pandas", "numpy", "pydantic>=2",
                       "pyyaml", "tqdm", "peft"]


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


def start_run(settings: TrackingSettings, run_id: str | None, run_name: str, params: dict | None = None,
              tags: dict | None = None) -> str:
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


def end_run() -> None:
    import mlflow

    mlflow.end_run()


def mlflow_key(name: str) -> str:
    """A metric or tag name as MLflow accepts it: ``@`` is not allowed there and becomes ``_at_``."""
    return name.replace("@", "_at_")


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log to the active run, names through :func:`mlflow_key`."""
    import mlflow

    mlflow.log_metrics({mlflow_key(k): v for k, v in metrics.items()}, step=step)


def log_to_run(settings: TrackingSettings, run_id: str, metrics: dict[str, float] | None = None,
               artifacts: list[Path] = (), artifact_path: str = "plots") -> None:
    """Add metrics and files to a finished run (evaluation into the training run, say)."""
    import mlflow

    use(settings)
    with mlflow.start_run(run_id=run_id):
        if metrics:
            log_metrics(metrics)
        for f in artifacts:
            mlflow.log_artifact(str(f), artifact_path=artifact_path)


def _example_image_b64() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def log_pyfunc(model_dir: Path, embed_dim: int, name: str = "model") -> str:
    """Log ``model_dir`` as a models-from-code pyfunc in the active run; returns the model URI.

    MLflow stores ``mlflow_pyfunc.py`` and the model folder as artifacts: loading never unpickles.
    """
    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "text", required=False), ColSpec("string", "image", required=False)]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, embed_dim))]))
    example = pd.DataFrame({"text": ["a large red circle on a striped background", None],
                            "image": [None, _example_image_b64()]})
    info = mlflow.pyfunc.log_model(name=name, python_model=str(PYFUNC_FILE),
                                   artifacts={"mpe_model": str(model_dir)}, code_paths=[str(PACKAGE_DIR)],
                                   signature=signature, input_example=example,
                                   pip_requirements=PYFUNC_REQUIREMENTS)
    return info.model_uri


def log_trained_model(settings: TrackingSettings, run_id: str, model_dir: Path, embed_dim: int) -> str:
    """Log the trained folder as the pyfunc into the training run; returns the model URI."""
    import mlflow

    use(settings)
    with mlflow.start_run(run_id=run_id):
        return log_pyfunc(model_dir, embed_dim)


def pyfunc_model_folder(mlflow_model_dir: Path) -> Path:
    """The ``mpe_model`` folder inside a local copy of a logged pyfunc. MLflow stores an artifact under
    its source folder's name (``artifacts/trained``, say), not under its key: the MLmodel file maps them."""
    import yaml

    mlmodel = Path(mlflow_model_dir) / "MLmodel"
    try:
        meta = yaml.safe_load(mlmodel.read_text())
        return Path(mlflow_model_dir) / meta["flavors"]["python_function"]["artifacts"]["mpe_model"]["path"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise ConfigError(f"{mlmodel}: not an mpe pyfunc (no python_function artifact 'mpe_model': "
                          f"{type(err).__name__}: {err})") from None


def download_model_folder(model_uri: str) -> Path:
    """The ``mpe_model`` folder of a logged or registered pyfunc, downloaded locally (a local store's
    files are used in place)."""
    import mlflow
    import yaml

    return pyfunc_model_folder(Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri)))


def parent_run(settings: TrackingSettings, name: str, tags: dict[str, str]) -> str:
    """The run with exactly these tags (created if there is none): the parent a suite's runs nest under."""
    import mlflow

    client = use(settings)
    exp = mlflow.get_experiment_by_name(settings.experiment)
    found = mlflow.search_runs([exp.experiment_id], output_format="list",
                               filter_string=" and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items()))
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
