"""Stage ``register`` (run by the flow after ``dvc push``): the model the train stage logged, registered
in MLflow with its lineage, through the promotion gate."""

from __future__ import annotations

from pathlib import Path

from mpe.config import Params
from mpe.errors import StageInputError
from mpe.files import storage
from mpe.files.atomic import write_json
from mpe.files.hashing import checkpoint_sha256
from mpe.provenance.lineage import lineage_tags
from mpe.provenance.run_record import recorded_files
from mpe.records import EVAL, REGISTER, TRAIN, TrainingSummary, metrics_file, read_metrics
from mpe.serving.mlflow_model import download_model_folder
from mpe.tracking.gate import is_benchmark_metric
from mpe.tracking.registry import register_and_gate
from mpe.tracking.runs import log_to_run, require_run
from mpe.tracking.settings import tracking_settings


def run(params: Params, project: Path = Path("."), flow_run_id: str | None = None, record: dict | None = None) -> dict:
    """Register the trained model. ``record`` is the run's outputs commit (``mpe.provenance.run_record``): its branch
    and commit become tags, and the lock, params and pipeline files go to the training run as artifacts
    (the record a project without git has)."""
    data_root = params.data.out_dir
    train = TrainingSummary.read(params.metrics_dir)
    if train is None or not train.model_uri:
        raise StageInputError(
            f"{metrics_file(params.metrics_dir, TRAIN)}: no model logged by the train stage "
            "(no model_uri); run `mpe train` with MLflow tracking"
        )
    evaluation = read_metrics(params.metrics_dir, EVAL)
    if evaluation is None:
        raise StageInputError(f"{metrics_file(params.metrics_dir, EVAL)}: missing; run `mpe evaluate` first")
    settings = tracking_settings(params.mlflow)
    require_run(settings, train.mlflow_run_id, metrics_file(params.metrics_dir, TRAIN))
    ks, batch_size = tuple(params.evaluate.ks), params.evaluate.batch_size
    gate = params.registry.gate_metric
    # a gate on a benchmark re-measures the champion on that benchmark alone
    gated = [b for b in params.evaluate.benchmarks if is_benchmark_metric(gate) and b.name == gate.split(".")[0]]

    def evaluate_champion(uri: str) -> dict:
        # torch and the model only when a champion is re-measured: `mpe run` imports this stage in its driver
        from mpe.evaluation.benchmarks.scoring import benchmark_metrics, read_benchmarks
        from mpe.evaluation.tasks import TextEmbedder, evaluate_model, flat_metrics
        from mpe.model.multi_prompt_clip import MultiPromptCLIP

        sets = read_benchmarks(gated)
        model = MultiPromptCLIP.from_pretrained(download_model_folder(uri))
        embed = TextEmbedder(model, None, batch_size)
        metrics = flat_metrics(evaluate_model(model, data_root, embed, ks))
        return {**metrics, **benchmark_metrics(model, sets, embed, ks, batch_size)[0]}

    base_dir = Path(params.base_model.out_dir)
    lineage = lineage_tags(
        project,
        {
            "data": params.data.out_dir,
            "cache": params.cache.root,
            "model": params.train.out_dir,
            "base_model": params.base_model.out_dir,
        },
        base_model=params.base_model.name + (f"@{params.base_model.revision}" if params.base_model.revision else ""),
        base_model_sha256=checkpoint_sha256(base_dir) if base_dir.exists() else "",
        test_shards=storage.join(data_root, "shards", "test"),
        train_info=train.to_json(),
        flow_run_id=flow_run_id,
    )
    lineage.update(
        {
            "mpe.run_ref": (record or {}).get("ref", ""),
            "mpe.run_commit": (record or {}).get("commit", ""),
            "mpe.provenance.lineage": "git+artifacts" if record else "artifacts",
        }
    )
    if train.mlflow_run_id:
        by_folder: dict[str, list[Path]] = {}
        for name in recorded_files(project):  # metrics/eval.json -> lineage/metrics/eval.json
            if (Path(project) / name).exists():
                folder = Path(name).parent.as_posix()
                by_folder.setdefault("lineage" if folder == "." else f"lineage/{folder}", []).append(
                    Path(project) / name
                )
        for artifact_path, files in by_folder.items():
            log_to_run(settings, train.mlflow_run_id, artifacts=files, artifact_path=artifact_path)
    result = register_and_gate(
        settings, params.registry, train.model_uri, evaluation["trained"], lineage, evaluate_champion
    )
    write_json(metrics_file(params.metrics_dir, REGISTER), result)
    return result
