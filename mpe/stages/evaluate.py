"""Stage ``evaluate``: the trained model and its untrained twin (same architecture and trunk) on the
test split, the negation set and the zero-shot tasks, against chance; the trained model on the standard
benchmarks of ``evaluate.benchmarks`` (``<name>.<metric>`` keys); plots; the numbers and plots added to the
MLflow run that trained the model."""

from __future__ import annotations

import json
from pathlib import Path

from mpe import storage
from mpe.atomic import write_json
from mpe.benchmark_sets.scoring import benchmark_metrics, read_benchmarks
from mpe.cache_compute import cache_fields
from mpe.cache_store import TextStates, open_active
from mpe.config import ModelConfig, Params
from mpe.data.loader import load_split
from mpe.data.stats import verified_shards
from mpe.evaluation import (TextEmbedder, analysis_metrics, chance_levels, evaluate_model, evaluate_split, flat_metrics,
                            prompt_patch_maps)
from mpe.model import MultiPromptCLIP
from mpe.plots import loss_curves, prompt_maps, recall_bars
from mpe.text.tower import LLMTextTower
from mpe.tracking import log_to_run
from mpe.tracking_settings import tracking_settings


def _untrained_twin(cfg: ModelConfig, pretrained: str | None) -> ModelConfig:
    """The trained model's architecture; a fine-tuned pretrained vision tower starts again from its original
    checkpoint (the saved ``vision_model/`` holds the tuned weights). A frozen one is the same either way."""
    if cfg.vision.pretrained and pretrained and not cfg.vision.freeze:
        return cfg.model_copy(update={"vision": cfg.vision.model_copy(update={"pretrained": pretrained})})
    return cfg


def run(params: Params) -> dict:
    ks = tuple(params.evaluate.ks)
    batch_size = params.evaluate.batch_size
    data_root = params.data.out_dir
    base_dir = Path(params.base_model.out_dir)
    metrics_dir, plots = Path(params.evaluate.out_dir), Path(params.evaluate.plots_dir)
    for split in {"test", *params.evaluate.splits}:
        verified_shards(data_root, split, params.data.skip_corrupt_shards)  # a bad shard is named, not used silently
    benchmarks = read_benchmarks(params.evaluate.benchmarks)  # a missing or malformed file fails before models load
    trained = MultiPromptCLIP.from_pretrained(params.train.out_dir)
    cache = None
    if params.cache.enabled and isinstance(trained.text, LLMTextTower):
        cache = TextStates(open_active(params.cache.root, cache_fields(base_dir, trained.cfg.text, params.cache.dtype)))
    models = {"trained": trained}
    if params.evaluate.compare_untrained:
        twin = _untrained_twin(trained.cfg, params.model.vision.pretrained)
        models["untrained"] = MultiPromptCLIP.from_base(base_dir, twin, seed=params.seed).eval()
    results = {name: evaluate_model(m, data_root, TextEmbedder(m, cache, batch_size), ks)
               for name, m in models.items()}
    report = {name: flat_metrics(r) for name, r in results.items()}
    report["chance"] = chance_levels(results["trained"], ks)
    report["analysis"] = {name: analysis_metrics(r) for name, r in results.items()}
    for split in params.evaluate.splits:
        if split != "test":
            r = evaluate_split(trained, data_root, split, TextEmbedder(trained, cache, batch_size), ks)
            report[split] = {"trained": {k: v for k, v in r[split].items() if "@" in k}}
    if benchmarks:
        flat, report["benchmarks"] = benchmark_metrics(trained, benchmarks, TextEmbedder(trained, cache, batch_size),
                                                       ks, batch_size)
        report["trained"].update(flat)
    report["details"] = results
    write_json(metrics_dir / "eval.json", report)

    keys = [k for k in report["trained"] if not k.startswith("compositional_") and "." not in k]  # test split only
    recall_bars({m: report[m] for m in ("trained", "untrained", "chance") if m in report}, keys,
                plots / "recall.png", "test split: trained vs untrained vs chance")
    history = metrics_dir / "train_history.json"
    if history.exists():
        loss_curves(json.loads(history.read_text()), plots / "loss.png")
    shown = load_split(storage.join(data_root, "shards", "test"))[0][:4]
    emb = TextEmbedder(trained, cache)([s.caption for s in shown])
    prompt_maps([s.image for s in shown], prompt_patch_maps(trained, [s.image for s in shown], emb).numpy(),
                [s.caption for s in shown], plots / "prompt_maps.png")

    train_file = metrics_dir / "train.json"
    run_id = json.loads(train_file.read_text()).get("mlflow_run_id") if train_file.exists() else None
    if run_id:
        metrics = {f"eval.{k}": v for k, v in report["trained"].items()}
        metrics.update({f"eval_untrained.{k}": v for k, v in report.get("untrained", {}).items()})
        metrics.update({f"eval_analysis.{k}": v for k, v in report["analysis"]["trained"].items()})
        metrics.update({f"eval_untrained_analysis.{k}": v for k, v in report["analysis"].get("untrained", {}).items()})
        for split in params.evaluate.splits:
            if split != "test":
                metrics.update({f"eval_{split}.{k}": v for k, v in report[split]["trained"].items()})
        log_to_run(tracking_settings(params.mlflow), run_id, metrics, sorted(plots.glob("*.png")))
    return report
