"""``mpe reweight`` (not a DVC stage: an analysis of a trained model): aspect re-weighted inference — the K
weights chosen on the validation split, the test split scored with them, the gain over equal weights;
written to ``reweight.json`` in the metrics folder and logged to the model's training run
(``eval_reweight.*``)."""

from __future__ import annotations

from pathlib import Path

from mpe.cache.compute import open_cache
from mpe.cache.store import TextStates
from mpe.config import Params
from mpe.errors import StageInputError
from mpe.evaluation.reweight import objective, retrieval_with, search
from mpe.evaluation.tasks import TextEmbedder, split_embeddings
from mpe.files import storage
from mpe.files.atomic import write_json
from mpe.model.multi_prompt_clip import MultiPromptCLIP
from mpe.model.text.tower import LLMTextTower
from mpe.records import REWEIGHT, metrics_file, to_mlflow, training_run_id
from mpe.tracking.runs import log_to_run
from mpe.tracking.settings import tracking_settings


def run(params: Params, model_dir: str | None = None) -> dict:
    data_root, ks = params.data.out_dir, tuple(params.evaluate.ks)
    out = metrics_file(params.metrics_dir, REWEIGHT)
    model = MultiPromptCLIP.from_pretrained(model_dir or params.train.out_dir)
    k = model.num_pieces
    if k < 2:
        result = {"skipped": "the model reads one embedding: there are no aspects to re-weight"}
        write_json(out, result)
        return result
    if not storage.list_files(storage.join(data_root, "shards", "val"), ".tar"):
        raise StageInputError(
            f"{storage.join(data_root, 'shards', 'val')}: reweighting chooses on a validation "
            "split; set data.shapes.val_captions (or give one) and rerun `mpe data`"
        )
    cache = None
    if params.cache.enabled and isinstance(model.text, LLMTextTower):
        cache = TextStates(
            open_cache(
                params.cache.root,
                Path(params.base_model.out_dir),
                model.cfg.text,
                params.cache.dtype,
                params.base_model.trust_remote_code,
            )
        )
    embed = TextEmbedder(model, cache, params.evaluate.batch_size)
    t_val, v_val, p_val = split_embeddings(model, data_root, "val", embed)
    weights, val_score = search(t_val, v_val, p_val, k, ks)
    val_uniform = objective(retrieval_with(t_val, v_val, p_val, [1.0] * k, ks))
    t, v, p = split_embeddings(model, data_root, "test", embed)
    uniform = retrieval_with(t, v, p, [1.0] * k, ks)
    chosen = retrieval_with(t, v, p, weights, ks)
    result = {
        "weights": weights,
        "val_objective_uniform": val_uniform,
        "val_objective": val_score,
        "test_uniform": uniform,
        "test_reweighted": chosen,
        "test_gain": objective(chosen) - objective(uniform),
    }
    write_json(out, result)
    run_id = training_run_id(params.metrics_dir)
    if run_id:
        logged = {"test_gain": result["test_gain"], "val_gain": val_score - val_uniform, **chosen}
        logged.update({f"w{i + 1}": w for i, w in enumerate(weights)})
        log_to_run(tracking_settings(params.mlflow), run_id, to_mlflow({"reweight": logged}))
    return result
