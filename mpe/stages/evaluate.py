"""Stage ``evaluate``: the trained model and its untrained twin (same architecture and trunk) on the
test split, the negation set, the zero-shot tasks and the linear probes of each aspect, against chance;
text↔video retrieval on the video test split (a video source's ``test``, or an image source's zero-shot
``video_test``); the trained model on the standard benchmarks of ``evaluate.benchmarks`` and the world's own
compositional sets (``<name>.<metric>`` keys); plots; the numbers and plots added to the MLflow run that
trained the model."""

from __future__ import annotations

from pathlib import Path

from mpe.cache.compute import open_cache
from mpe.cache.store import TextStates
from mpe.config import Params
from mpe.data.evaluation_sets import world_benchmarks
from mpe.data.loader import load_split
from mpe.data.stats import read_stats, verified_shards
from mpe.evaluation.benchmarks.scoring import benchmark_analysis, benchmark_metrics, read_benchmarks
from mpe.evaluation.plots import loss_curves, prompt_maps, recall_bars
from mpe.evaluation.tasks import (
    TextEmbedder,
    analysis_metrics,
    chance_levels,
    evaluate_model,
    evaluate_split,
    flat_metrics,
    prompt_patch_maps,
)
from mpe.evaluation.video_tasks import evaluate_videos, video_chance, video_flat
from mpe.files import storage
from mpe.files.atomic import write_json
from mpe.model.configuration import ModelConfig
from mpe.model.multi_prompt_clip import MultiPromptCLIP
from mpe.model.text.tower import LLMTextTower
from mpe.records import (
    EVAL,
    TRAIN,
    TRAIN_HISTORY,
    TrainingSummary,
    metrics_file,
    read_metrics,
    report_sections,
    to_mlflow,
    training_run_id,
)
from mpe.serving.mlflow_model import log_model_card
from mpe.serving.model_card import write_model_card
from mpe.tracking.runs import log_to_run, require_run
from mpe.tracking.settings import tracking_settings


def _untrained_twin(cfg: ModelConfig, pretrained: str | None) -> ModelConfig:
    """The trained model's architecture; a fine-tuned pretrained vision tower starts again from its original
    checkpoint (the saved ``vision_model/`` holds the tuned weights). A frozen one is the same either way."""
    if cfg.vision.pretrained and pretrained and not cfg.vision.freeze:
        return cfg.model_copy(update={"vision": cfg.vision.model_copy(update={"pretrained": pretrained})})
    return cfg


def _datasets(source: str, url_list: str | None) -> list[str]:
    """What the model card names as the training data: the shapes world, or the URL list by file name (a
    path particular to this machine is no dataset name)."""
    if source == "shapes" or not url_list:
        return ["mpe-shapes (synthetic)"]
    return [Path(url_list).name or url_list]


def run(params: Params) -> dict:
    ks = tuple(params.evaluate.ks)
    batch_size = params.evaluate.batch_size
    data_root = params.data.out_dir
    base_dir = Path(params.base_model.out_dir)
    plots = Path(params.evaluate.plots_dir)
    stats = read_stats(data_root)
    video_only = stats.get("modality") == "video"  # a video source: its test split is clips
    video_split = "test" if video_only else "video_test" if "video_test" in stats["splits"] else None
    for split in {"test", *params.evaluate.splits, *([video_split] if video_split else [])}:
        verified_shards(data_root, split, params.data.skip_corrupt_shards)  # a bad shard is named, not used silently
    # a missing or malformed file fails before models load; the world's own compositional sets come with its data
    benchmarks = read_benchmarks([*params.evaluate.benchmarks, *world_benchmarks(data_root)])
    run_id = training_run_id(params.metrics_dir)
    require_run(tracking_settings(params.mlflow), run_id, metrics_file(params.metrics_dir, TRAIN))  # before the work
    trained = MultiPromptCLIP.from_pretrained(params.train.out_dir)
    cache = None
    if params.cache.enabled and isinstance(trained.text, LLMTextTower):
        cache = TextStates(
            open_cache(
                params.cache.root, base_dir, trained.cfg.text, params.cache.dtype, params.base_model.trust_remote_code
            )
        )
    models = {"trained": trained}
    if params.evaluate.compare_untrained:
        twin = _untrained_twin(trained.cfg, params.model.vision.pretrained)
        models["untrained"] = MultiPromptCLIP.from_base(base_dir, twin, seed=params.seed).eval()
    embedders = {name: TextEmbedder(m, cache, batch_size) for name, m in models.items()}
    if video_only:
        results = {name: {} for name in models}
        report = {name: {} for name in models} | {"chance": {}, "analysis": {}}
    else:
        probes = params.evaluate.probe_train_images
        results = {
            name: evaluate_model(m, data_root, embedders[name], ks, probes, params.seed) for name, m in models.items()
        }
        report = {name: flat_metrics(r) for name, r in results.items()}
        report["chance"] = chance_levels(results["trained"], ks)
        report["analysis"] = {name: analysis_metrics(r) for name, r in results.items()}
    if video_split:  # every frame through the vision tower, mean-pooled (or the model's temporal pooling)
        folder = storage.join(data_root, "shards", video_split)
        for name, m in models.items():
            results[name].update(evaluate_videos(m, folder, embedders[name], ks))
            report[name].update(video_flat(results[name]))
        report["chance"].update(video_chance(results["trained"], ks))
    for split in params.evaluate.splits:
        if split != "test" and not video_only:
            r = evaluate_split(trained, data_root, split, TextEmbedder(trained, cache, batch_size), ks)
            report[split] = {"trained": {k: v for k, v in r[split].items() if "@" in k}}
    if benchmarks:
        flat, report["benchmarks"] = benchmark_metrics(
            trained, benchmarks, TextEmbedder(trained, cache, batch_size), ks, batch_size
        )
        report["trained"].update(flat)
        report["analysis"]["trained"].update(benchmark_analysis(report["benchmarks"]))
    report["details"] = results
    write_json(metrics_file(params.metrics_dir, EVAL), report)
    # the model card sits in the model folder (.dvcignore keeps it out of the train stage's hash)
    card = write_model_card(
        params.train.out_dir,
        params.registry.model_name,
        trained.cfg,
        trained.provenance,
        params.base_model.name if not Path(params.base_model.name).is_dir() else Path(params.base_model.name).name,
        _datasets(params.data.source, params.data.url_list),
        report,
    )

    keys = [  # the test splits' fractions (ranks, MdR and MnR, do not share their axis)
        k
        for k in report["trained"]
        if not k.startswith("compositional_") and "." not in k and ("R@" in k or k.endswith("accuracy"))
    ]
    recall_bars(
        {m: report[m] for m in ("trained", "untrained", "chance") if m in report},
        keys,
        plots / "recall.png",
        "test split: trained vs untrained vs chance",
    )
    history = read_metrics(params.metrics_dir, TRAIN_HISTORY)
    if history is not None:
        loss_curves(history, plots / "loss.png")
    if not video_only:
        shown = load_split(storage.join(data_root, "shards", "test"))[0][:4]
        emb = TextEmbedder(trained, cache)([s.caption for s in shown])
        prompt_maps(
            [s.image for s in shown],
            prompt_patch_maps(trained, [s.image for s in shown], emb).numpy(),
            [s.caption for s in shown],
            plots / "prompt_maps.png",
        )

    if run_id:
        settings = tracking_settings(params.mlflow)
        log_to_run(settings, run_id, to_mlflow(report_sections(report)), sorted(plots.glob("*.png")))
        train = TrainingSummary.read(params.metrics_dir)
        if train is not None and train.model_uri:
            log_model_card(settings, train.model_uri, card)
    return report
