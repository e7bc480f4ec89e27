"""MLflow: log the trained model as a pyfunc, register it with lineage tags, and gate promotion.

The new version becomes ``@champion`` only if its evaluation beats the current champion by
``register.margin`` on the same test set (the champion is re-evaluated on the current test set
when it was measured on another); otherwise it becomes ``@challenger`` and the reason is returned.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pandas as pd

PYFUNC_FILE = Path(__file__).with_name("mlflow_pyfunc.py")
PACKAGE_DIR = Path(__file__).parent


def _example_image_b64() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def log_pyfunc(model_dir: Path, embed_dim: int, name: str = "model") -> str:
    """Log ``model_dir`` as a models-from-code pyfunc in the active run; returns the model URI."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec
    import numpy as np

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "text", required=False), ColSpec("string", "image", required=False)]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, embed_dim))]))
    example = pd.DataFrame({"text": ["a large red circle on a striped background", None],
                            "image": [None, _example_image_b64()]})
    info = mlflow.pyfunc.log_model(name=name, python_model=str(PYFUNC_FILE),
                                   artifacts={"mpe_model": str(model_dir)}, code_paths=[str(PACKAGE_DIR)],
                                   signature=signature, input_example=example,
                                   pip_requirements=["torch", "transformers>=5,<6", "safetensors", "pillow",
                                                     "pandas", "numpy", "pydantic>=2", "pyyaml", "tqdm", "peft"])
    return info.model_uri


def gate_score(metrics: dict, metric: str) -> float:
    """The number the gate compares: one flat metric, or ``mean_recall`` over every R@k."""
    if metric == "mean_recall":
        vals = [v for k, v in metrics.items() if "_R@" in k and not k.startswith("compositional_")]
        if not vals:
            raise KeyError("no R@k metrics to average")
        return sum(vals) / len(vals)
    return metrics[metric]


def decide(new: float, champion: float | None, margin: float) -> tuple[bool, str]:
    """Promote when there is no champion, or when ``new >= champion + margin``."""
    if champion is None:
        return True, f"no champion yet: promoted with score {new:.4f}"
    if new >= champion + margin:
        return True, f"score {new:.4f} beats the champion's {champion:.4f} by at least {margin}"
    return False, (f"score {new:.4f} does not beat the champion's {champion:.4f} by the margin {margin}: "
                   "kept as challenger")


def register_and_gate(params, model_uri: str, new_metrics: dict, lineage: dict,
                      evaluate_champion=None) -> dict:
    """Register ``model_uri`` under ``register.model_name``, tag it, and set ``@champion`` or
    ``@challenger``. ``evaluate_champion(model_uri) -> metrics`` re-measures a champion that was
    evaluated on a different test set."""
    import mlflow
    from mlflow import MlflowClient

    from mpe.train import mlflow_settings

    cfg = params.registry
    mlflow.set_tracking_uri(mlflow_settings(params)["tracking_uri"])
    client = MlflowClient()
    same = _already_registered(client, cfg.model_name, lineage.get("dvc.model"))
    if same is not None:  # nothing changed since: keep the registry as it is
        alias = next(iter(same.aliases), None)
        return {"model_name": cfg.model_name, "version": str(same.version), "alias": alias or "none",
                "promoted": False, "skipped": True,
                "reason": f"this model (dvc md5 {lineage['dvc.model']}) is already version {same.version}",
                "score": None, "champion_score": None, "previous_champion_version": None}
    version = mlflow.register_model(model_uri, cfg.model_name)
    for k, v in lineage.items():
        client.set_model_version_tag(cfg.model_name, version.version, k, "" if v is None else str(v))
    score = gate_score(new_metrics, cfg.gate_metric)
    client.set_model_version_tag(cfg.model_name, version.version, f"eval.{cfg.gate_metric}", f"{score:.6f}")
    client.set_model_version_tag(cfg.model_name, version.version, "eval.metrics", json.dumps(new_metrics)[:4900])
    champion_score, champion_version = None, None
    try:
        champ = client.get_model_version_by_alias(cfg.model_name, "champion")
    except mlflow.exceptions.MlflowException:
        champ = None
    if champ is not None and str(champ.version) != str(version.version):
        champion_version = str(champ.version)
        same_test = champ.tags.get("test_set_sha256") == lineage.get("test_set_sha256")
        if same_test and f"eval.{cfg.gate_metric}" in champ.tags:
            champion_score = float(champ.tags[f"eval.{cfg.gate_metric}"])
        elif evaluate_champion is not None:
            champion_score = gate_score(evaluate_champion(f"models:/{cfg.model_name}@champion"), cfg.gate_metric)
    promote, reason = decide(score, champion_score, cfg.margin)
    alias = "champion" if promote else "challenger"
    client.set_registered_model_alias(cfg.model_name, alias, version.version)
    client.set_model_version_tag(cfg.model_name, version.version, "gate.decision", reason)
    return {"model_name": cfg.model_name, "version": str(version.version), "alias": alias, "promoted": promote,
            "reason": reason, "score": score, "champion_score": champion_score,
            "previous_champion_version": champion_version}


def _already_registered(client, name: str, model_md5: str | None):
    """The registered version whose model output has this DVC hash, if any."""
    if not model_md5:
        return None
    import mlflow

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    for v in versions:
        if v.tags.get("dvc.model") == model_md5:
            return client.get_model_version(name, v.version)  # search results omit aliases
    return None


def run_register_stage(params, project: Path = Path("."), flow_run_id: str | None = None) -> dict:
    """Register the model logged by the train stage, with lineage, through the promotion gate."""
    from mpe.atomic import write_text
    from mpe.lineage import lineage_tags

    metrics_dir = Path(params.evaluate.out_dir)
    train = json.loads((metrics_dir / "train.json").read_text())
    if not train.get("model_uri"):
        raise RuntimeError(f"{metrics_dir / 'train.json'} has no model_uri: the train stage logged no model")
    evaluation = json.loads((metrics_dir / "eval.json").read_text())

    def evaluate_champion(uri: str) -> dict:
        return _evaluate_registered(params, uri)

    result = register_and_gate(params, train["model_uri"], evaluation["trained"],
                               lineage_tags(params, project, flow_run_id), evaluate_champion)
    write_text(metrics_dir / "register.json", json.dumps(result, indent=1))
    return result


def _evaluate_registered(params, uri: str) -> dict:
    """Download a registered version's model folder and evaluate it on the current test split."""
    import mlflow

    from mpe.evaluate import TextEmbedder, evaluate_model, flat_metrics
    from mpe.model import MultiPromptCLIP

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/artifacts/mpe_model"))
    model = MultiPromptCLIP.from_pretrained(local)
    result = evaluate_model(model, Path(params.data.out_dir), TextEmbedder(model, None, params.evaluate.batch_size),
                            tuple(params.evaluate.ks), params.data.source == "shapes")
    return flat_metrics(result)
