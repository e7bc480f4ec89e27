"""The trained model as an MLflow model: logged as a *models-from-code* pyfunc (``pyfunc.py`` and the model
folder are stored as artifacts, so loading it never unpickles anything), and its model folder found again
in a downloaded copy."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from mpe.config import ServeConfig
from mpe.errors import ConfigError
from mpe.tracking.runs import use
from mpe.tracking.settings import TrackingSettings

PYFUNC_FILE = Path(__file__).with_name("pyfunc.py")
REQUEST_LIMITS = ("max_rows", "max_caption_chars", "max_request_megapixels")
PACKAGE_DIR = Path(__file__).parents[1]  # the mpe package, logged with the model as its code
PYFUNC_REQUIREMENTS = [
    "torch",
    "transformers>=5,<6",
    "safetensors",
    "pillow",
    "pandas",
    "numpy",
    "pydantic>=2",
    "pyyaml",
    "tqdm",
    "peft",
]


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
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, embed_dim))]),
    )
    example = pd.DataFrame(
        {"text": ["a large red circle on a striped background", None], "image": [None, _example_image_b64()]}
    )
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(PYFUNC_FILE),
        # the request limits of `mpe serve`; load_model(uri, model_config={...}) may change them
        model_config=ServeConfig().model_dump(include=set(REQUEST_LIMITS)),
        artifacts={"mpe_model": str(model_dir)},
        code_paths=[str(PACKAGE_DIR)],
        signature=signature,
        input_example=example,
        pip_requirements=PYFUNC_REQUIREMENTS,
    )
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
        raise ConfigError(
            f"{mlmodel}: not an mpe pyfunc (no python_function artifact 'mpe_model': {type(err).__name__}: {err})"
        ) from None


def download_model_folder(model_uri: str) -> Path:
    """The ``mpe_model`` folder of a logged or registered pyfunc, downloaded locally (a local store's
    files are used in place)."""
    import mlflow

    return pyfunc_model_folder(Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri)))


SEARCH_INDEX_TAG = "mpe.search_index"  # a registered version's tag: the runs:/ URI of its search index
SEARCH_INDEX_PATH = "search_index"  # where the index lies in the training run's artifacts


def log_model_card(settings: TrackingSettings, model_uri: str, card: Path) -> None:
    """Put the model card beside ``MLmodel`` in the logged model ``model_uri`` (``models:/m-…``), so a
    downloaded or registered copy carries it."""
    import mlflow

    client = use(settings)
    model_id = model_uri.removeprefix("models:/")
    try:
        client.get_logged_model(model_id)
    except mlflow.exceptions.MlflowException as err:
        raise ConfigError(f"{model_uri}: not a logged model in {settings.tracking_uri} ({err.message})") from None
    client.log_model_artifact(model_id, str(card))


def log_search_index(settings: TrackingSettings, folder: Path, name: str, version: str) -> str:
    """Log the index folder into the training run of version ``version`` of ``name`` and tag the version with
    its URI (kept if the version already names one); returns the URI."""
    client = use(settings)
    mv = client.get_model_version(name, version)
    current = mv.tags.get(SEARCH_INDEX_TAG)
    if current:
        return current
    if not mv.run_id:
        raise ConfigError(f"models:/{name}/{version}: no training run to log its search index into")
    client.log_artifacts(mv.run_id, str(folder), SEARCH_INDEX_PATH)
    uri = f"runs:/{mv.run_id}/{SEARCH_INDEX_PATH}"
    client.set_model_version_tag(name, version, SEARCH_INDEX_TAG, uri)
    return uri


def registered_search_index(ref: str) -> Path | None:
    """The search index logged with the registered version ``ref`` names (``models:/NAME@ALIAS`` or
    ``models:/NAME/VERSION``), downloaded; None when ``ref`` is no registry reference or the version has none.
    The tracking URI must be set."""
    import mlflow

    if not ref.startswith("models:/") or ref.startswith("models:/m-"):
        return None
    name, sep, which = ref.removeprefix("models:/").partition("@")
    client = mlflow.MlflowClient()
    try:
        if sep:
            version = client.get_model_version_by_alias(name, which)
        else:
            name, _, number = name.rpartition("/")
            version = client.get_model_version(name, number)
    except mlflow.exceptions.MlflowException:
        return None
    uri = version.tags.get(SEARCH_INDEX_TAG)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri)) if uri else None
