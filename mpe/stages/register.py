"""Stage ``register`` (run by the flow after ``dvc push``): the model the train stage logged, registered
in MLflow with its lineage, through the promotion gate."""

from __future__ import annotations

import json
from pathlib import Path

from mpe import storage
from mpe.atomic import write_json
from mpe.config import Params
from mpe.errors import StageInputError
from mpe.evaluation import TextEmbedder, evaluate_model, flat_metrics
from mpe.hashing import checkpoint_sha256
from mpe.lineage import lineage_tags
from mpe.model import MultiPromptCLIP
from mpe.registry import register_and_gate
from mpe.tracking import download_model_folder
from mpe.tracking_settings import tracking_settings


def run(params: Params, project: Path = Path("."), flow_run_id: str | None = None) -> dict:
    metrics_dir = Path(params.evaluate.out_dir)
    data_root = params.data.out_dir
    train = json.loads((metrics_dir / "train.json").read_text())
    if not train.get("model_uri"):
        raise StageInputError(f"{metrics_dir / 'train.json'} has no model_uri: the train stage logged no model")
    evaluation = json.loads((metrics_dir / "eval.json").read_text())
    ks, batch_size = tuple(params.evaluate.ks), params.evaluate.batch_size

    def evaluate_champion(uri: str) -> dict:
        model = MultiPromptCLIP.from_pretrained(download_model_folder(uri))
        return flat_metrics(evaluate_model(model, data_root, TextEmbedder(model, None, batch_size), ks))

    base_dir = Path(params.base_model.out_dir)
    lineage = lineage_tags(
        project, {"data": params.data.out_dir, "cache": params.cache.root, "model": params.train.out_dir,
                  "base_model": params.base_model.out_dir},
        base_model=params.base_model.name + (f"@{params.base_model.revision}" if params.base_model.revision else ""),
        base_model_sha256=checkpoint_sha256(base_dir) if base_dir.exists() else "",
        test_shards=storage.join(data_root, "shards", "test"), train_info=train, flow_run_id=flow_run_id)
    result = register_and_gate(tracking_settings(params.mlflow), params.registry, train["model_uri"],
                               evaluation["trained"], lineage, evaluate_champion)
    write_json(metrics_dir / "register.json", result)
    return result
