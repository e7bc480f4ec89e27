"""``mpe reweight``: aspect re-weighted inference for a trained model — the K weights chosen on the
validation split, the test split scored with them, the gain over equal weights; written to
``metrics/reweight.json`` and logged to the model's training run (``eval_reweight.*``)."""

from __future__ import annotations

import json
from pathlib import Path

from mpe import storage
from mpe.atomic import write_json
from mpe.cache_compute import cache_fields
from mpe.cache_store import TextStates, open_active
from mpe.config import Params
from mpe.errors import StageInputError
from mpe.evaluation import TextEmbedder, split_embeddings
from mpe.model import MultiPromptCLIP
from mpe.retrieval_metrics import retrieval_from_scores
from mpe.reweight import objective, search, weighted_scores
from mpe.text.tower import LLMTextTower
from mpe.tracking import log_to_run
from mpe.tracking_settings import tracking_settings


def run(params: Params, model_dir: str | None = None) -> dict:
    data_root, ks = params.data.out_dir, tuple(params.evaluate.ks)
    metrics_dir = Path(params.evaluate.out_dir)
    model = MultiPromptCLIP.from_pretrained(model_dir or params.train.out_dir)
    k = model.num_pieces
    if k < 2:
        result = {"skipped": "the model reads one embedding: there are no aspects to re-weight"}
        write_json(metrics_dir / "reweight.json", result)
        return result
    if not storage.list_files(storage.join(data_root, "shards", "val"), ".tar"):
        raise StageInputError(f"{storage.join(data_root, 'shards', 'val')}: reweighting chooses on a validation "
                              "split; set data.shapes.val_captions (or give one) and rerun `mpe data`")
    cache = None
    if params.cache.enabled and isinstance(model.text, LLMTextTower):
        base = Path(params.base_model.out_dir)
        cache = TextStates(open_active(params.cache.root, cache_fields(base, model.cfg.text, params.cache.dtype)))
    embed = TextEmbedder(model, cache, params.evaluate.batch_size)
    t_val, v_val, p_val = split_embeddings(model, data_root, "val", embed)
    weights, val_score = search(t_val, v_val, p_val, k, ks)
    val_uniform = objective(retrieval_from_scores(weighted_scores(t_val, v_val, [1.0] * k, k), p_val, ks))
    t, v, p = split_embeddings(model, data_root, "test", embed)
    uniform = retrieval_from_scores(weighted_scores(t, v, [1.0] * k, k), p, ks)
    chosen = retrieval_from_scores(weighted_scores(t, v, weights, k), p, ks)
    result = {"weights": weights, "val_objective_uniform": val_uniform, "val_objective": val_score,
              "test_uniform": uniform, "test_reweighted": chosen,
              "test_gain": objective(chosen) - objective(uniform)}
    write_json(metrics_dir / "reweight.json", result)
    train_file = metrics_dir / "train.json"
    run_id = json.loads(train_file.read_text()).get("mlflow_run_id") if train_file.exists() else None
    if run_id:
        logged = {"eval_reweight.test_gain": result["test_gain"], "eval_reweight.val_gain": val_score - val_uniform}
        logged.update({f"eval_reweight.w{i + 1}": w for i, w in enumerate(weights)})
        logged.update({f"eval_reweight.{key}": v for key, v in chosen.items()})
        log_to_run(tracking_settings(params.mlflow), run_id, logged)
    return result
