"""Ray Train: the loop every ``TorchTrainer`` worker runs, and the trainer that runs it.

Every worker builds the same model (same seed), streams its own shards, embeds its local batch, and
computes its local loss against the global batch; gradients are averaged across workers. Rank 0 logs
to MLflow and checkpoints every ``checkpoint_every`` steps. A rerun with the same run name and storage
resumes from the last checkpoint, and ``FailureConfig(max_failures)`` restarts failed workers from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mpe.config import RayConfig, TrainConfig
from mpe.data.train_stream import StreamSpec, TrainLoader
from mpe.errors import ConfigError, MpeError
from mpe.files.atomic import write_json
from mpe.model.configuration import ModelConfig
from mpe.model.losses import Dist
from mpe.model.multi_prompt_clip import MultiPromptCLIP
from mpe.runtime.precision import autocast_of
from mpe.runtime.ray_cluster import ensure_ray, torch_config
from mpe.tracking.runs import end_run, log_metrics, start_run
from mpe.tracking.settings import TrackingSettings
from mpe.training.checkpoint import CheckpointCorrupt, load_trainable, newest_intact, read_checkpoint, save_checkpoint
from mpe.training.optim import build_optimizer, build_scheduler
from mpe.training.step import Batch, NonFiniteStep, train_step

NON_FINITE_FILE = "non_finite.json"  # in the run folder: the step that stopped the run, by rank


class NonFiniteLoss(MpeError):
    """Training stopped at a step whose loss (or gradients) were not finite: the message names the step,
    the ranks, and the samples whose embeddings were not finite."""

    def __init__(self, record: dict, run_dir: Path):
        ranks = record["ranks"]
        where = ", ".join(f"rank {r['rank']} (loss {r['loss']})" for r in ranks if not math.isfinite(r["loss"]))
        keys = [k for r in ranks for k in r["keys"]]
        if keys and len(keys) < sum(r["samples"] for r in ranks):
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            why = f"sample(s) {shown} have non-finite embeddings: check their data and cache shards"
        elif keys:
            why = "every sample's embedding is non-finite: the weights diverged (lower train.lr)"
        else:
            why = "every sample's embedding is finite: the loss or the gradients overflowed (lower train.lr)"
        super().__init__(
            f"training stopped at step {record['step']}: the loss is not finite on {where or 'some rank'}; {why}; "
            f"nothing was exported, and the checkpoints in {run_dir} stop before that step"
        )


@dataclass
class TrainJob:
    """Everything a worker needs, JSON-able (Ray ships it to every worker)."""

    seed: int
    model: dict
    train: dict
    base_dir: str
    trust_remote_code: bool
    provenance: dict
    total_steps: int
    stream: dict  # StreamSpec fields but rank and world
    tracking: dict | None
    logged_params: dict
    run_tags: dict
    run_name: str
    run_dir: str  # the Ray run folder (storage_path/run_name) when it is local
    compute_dtype: str  # "bfloat16" | "float32": decided once, on the driver, the same for every rank
    init_weights: str | None = None  # trainable weights to start from (safetensors), else the seed's

    @property
    def model_cfg(self) -> ModelConfig:
        return ModelConfig.model_validate(self.model)

    @property
    def train_cfg(self) -> TrainConfig:
        return TrainConfig.model_validate(self.train)


def build_model(job: TrainJob) -> MultiPromptCLIP:
    return MultiPromptCLIP.from_base(
        job.base_dir,
        job.model_cfg,
        trust_remote_code=job.trust_remote_code,
        provenance=dict(job.provenance),
        seed=job.seed,
    )


class _RankZeroTracking:
    """MLflow from rank 0 only: the run is started once and resumed after a restart. Per-step metrics are
    logged when the checkpoint that covers them is written, so steps trained again after a restart are
    never logged twice."""

    def __init__(self, job: TrainJob, rank: int, state: dict):
        self.active = rank == 0 and job.tracking is not None
        self.pending: list[dict] = []
        if not self.active:
            return
        settings = TrackingSettings(**job.tracking)
        recorded = state.get("mlflow_run_id")
        state["mlflow_run_id"] = start_run(
            settings,
            recorded,
            job.run_name,
            job.logged_params,
            {"ray_run_name": job.run_name, "mpe.stage": "train", **job.run_tags},
        )
        if recorded and state["mlflow_run_id"] != recorded:  # a new store: the steps trained so far go to it
            for row in state["history"]:
                if row["step"] % job.train_cfg.log_every == 0:
                    log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        if state["restored_from_step"] is not None:
            log_metrics({"restored_from_step": state["restored_from_step"]}, step=state["step"])

    def log(self, row: dict, every: int) -> None:
        if self.active and row["step"] % every == 0:
            self.pending.append(row)

    def flush(self) -> None:
        for row in self.pending:
            log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        self.pending = []

    def end(self, status: str = "FINISHED") -> None:
        if self.active:
            end_run(status)


def _restore(model, optimizer, scheduler, run_dir: Path) -> dict:
    """The state to continue from: the newest intact checkpoint of the run. That is Ray's latest one
    unless it is corrupt, or a newer one exists on disk that Ray never registered (the driver was
    killed between a worker writing it and the controller recording it); either is named in the log."""
    import ray.train

    state = {"step": 0, "history": [], "mlflow_run_id": None, "restored_from_step": None}
    ckpt = ray.train.get_checkpoint()
    restored = None
    if ckpt:
        try:
            with ckpt.as_directory() as d:
                restored = read_checkpoint(Path(d))
        except CheckpointCorrupt as err:
            if not Path(ckpt.path).exists():
                raise
            print(f"mpe: {err}", flush=True)
    # The run folder is named by the run's fingerprint, so anything in it belongs to this very run.
    on_disk = newest_intact(run_dir) if run_dir.is_dir() else None
    if on_disk is not None and (restored is None or on_disk[1][2]["step"] > restored[2]["step"]):
        print(f"mpe: resuming from {on_disk[0].name} (step {on_disk[1][2]['step']})", flush=True)
        restored = on_disk[1]
    if restored is None:
        if ckpt:
            raise CheckpointCorrupt(f"no intact checkpoint to resume from in {run_dir}")
        return state
    weights, optim, state = restored
    load_trainable(model, weights)
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    state["restored_from_step"] = state["step"]
    return state


def _load_start(model, path: Path) -> None:
    """The weights a run starts from: every trainable parameter, nothing else (safetensors only)."""
    from safetensors.torch import load_file

    start = load_file(str(path))
    trainable = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    wrong = sorted(set(trainable) ^ set(start)) + [
        n for n in trainable if n in start and start[n].shape != trainable[n]
    ]
    if wrong:
        raise ConfigError(
            f"{path}: the starting weights do not fit this model's trainable parameters "
            f"(first: {wrong[:3]}); set train.init_from: scratch"
        )
    load_trainable(model, start)


def _inject_failure(tcfg: TrainConfig, step: int, rank: int, world: int, marker: Path) -> None:
    """Testing (``train.fail_at_step``): the last worker raises once at that step."""
    if tcfg.fail_at_step is not None and step == tcfg.fail_at_step and rank == world - 1 and not marker.exists():
        marker.write_text(f"injected failure at step {step}")
        raise RuntimeError(f"injected worker failure at step {step} (train.fail_at_step)")


def _to_batch(b: dict, model, device) -> Batch:
    pixels = model.vision.transform.normalize(b["pixels"].to(device))
    negatives = {}
    if "negative_ids" in b:
        negatives = {"caption_ids": b["caption_ids"], "negative_ids": b["negative_ids"]}
        if "negative_states" in b:
            negatives.update(negative_states=b["negative_states"].float(), negative_lens=b["negative_lens"].tolist())
        else:
            negatives["negative_texts"] = b["negatives"]
    if "states" in b:
        return Batch(pixels, states=b["states"].float(), caption_lens=b["caption_lens"].tolist(), **negatives)
    return Batch(pixels, captions=b["captions"], **negatives)


def _gather_data_states(loader: TrainLoader, world: int) -> tuple[dict, dict]:
    """Every rank's loader state (a checkpoint is written by rank 0 only) and the skipped samples summed."""
    import torch.distributed as dist

    mine = (loader.state(), loader.skipped_total())
    if world == 1 or not dist.is_initialized():
        gathered = [mine]
    else:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
    skipped: dict[str, int] = {}
    for _, counts in gathered:
        for k, v in counts.items():
            skipped[k] = skipped.get(k, 0) + v
    return {str(r): st for r, (st, _) in enumerate(gathered)}, skipped


def _stop_non_finite(bad: NonFiniteStep, step: int, keys: list[str], rank: int, world: int, run_dir: Path) -> None:
    """Every rank hit the same non-finite step: rank 0 writes what each saw (local loss, the keys of its
    samples whose embeddings are not finite) to the run folder, where the driver turns it into the error.
    Nothing of this step is checkpointed; the run's last checkpoint is the step before it or earlier."""
    import torch.distributed as dist

    mine = {"rank": rank, "loss": bad.loss, "samples": len(keys), "keys": [keys[i] for i in bad.rows]}
    gathered = [mine]
    if world > 1 and dist.is_initialized():
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
    if rank == 0:
        write_json(run_dir / NON_FINITE_FILE, {"step": step, "ranks": gathered})


def _report(row: dict, model, optimizer, scheduler, state: dict, rank: int) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(row, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(Path(d), model, optimizer, scheduler, state)
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(d))


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train

    job = TrainJob(**config)
    tcfg = job.train_cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(tcfg.threads_per_worker or max(1, (os.cpu_count() or 2) // world))
    device = torch.device("cuda" if tcfg.use_gpu and torch.cuda.is_available() else "cpu")
    model = build_model(job)
    if job.init_weights:  # a checkpoint of this run, if any, overrides it below (_restore)
        _load_start(model, Path(job.init_weights))
    model = model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, tcfg.lr, tcfg.weight_decay)
    scheduler = build_scheduler(optimizer, tcfg.warmup_steps, job.total_steps)
    state = _restore(model, optimizer, scheduler, Path(job.run_dir))
    tracking = _RankZeroTracking(job, rank, state)
    spec = StreamSpec(**{**job.stream, "rank": rank, "world": world})
    loader = TrainLoader(spec, resume=(state.get("data") or {}).get(str(rank)), step=state["step"])
    keys_log = Path(job.run_dir) / "sample_keys" / f"rank{rank}.jsonl" if tcfg.log_sample_keys else None
    dist = Dist(rank, world)
    autocast = autocast_of(job.compute_dtype)  # the driver's decision: ranks never probe on their own
    state["compute_dtype"] = job.compute_dtype
    while state["step"] < job.total_steps:
        _inject_failure(tcfg, state["step"], rank, world, Path(job.run_dir) / ".injected_failure")
        t0 = time.perf_counter()
        b = next(loader)
        waited = time.perf_counter() - t0
        try:
            terms = train_step(
                model, _to_batch(b, model, device), optimizer, scheduler, trainable, tcfg.grad_clip, dist, autocast
            )
        except NonFiniteStep as bad:
            _stop_non_finite(bad, state["step"] + 1, b["keys"], rank, world, Path(job.run_dir))
            loader.close()
            tracking.end("FAILED")
            return
        row = {"step": state["step"] + 1, **terms}
        row.update(data_wait_s=waited, step_s=time.perf_counter() - t0)
        if keys_log is not None:
            keys_log.parent.mkdir(parents=True, exist_ok=True)
            with open(keys_log, "a") as f:
                f.write(json.dumps({"step": row["step"], "keys": b["keys"]}) + "\n")
        state["step"] = row["step"]
        state["history"].append(row)
        tracking.log(row, tcfg.log_every)
        if row["step"] % tcfg.checkpoint_every == 0 or row["step"] == job.total_steps:
            state["data"], state["skipped_samples"] = _gather_data_states(loader, world)
            _report(row, model, optimizer, scheduler, state, rank)
            tracking.flush()
    if state["restored_from_step"] == job.total_steps:  # nothing was left: the final state says so
        _report({"step": state["step"]}, model, optimizer, scheduler, state, rank)
    loader.close()
    tracking.end()


def fit(job: TrainJob, tcfg: TrainConfig, ray_cfg: RayConfig, storage: Path) -> tuple[dict, dict]:
    """Run (or resume) the Ray Train run ``job.run_name`` under ``storage``; returns the final
    checkpoint's trainable weights and state."""
    import ray.train
    from ray.train.torch import TorchTrainer

    (storage / job.run_name).mkdir(parents=True, exist_ok=True)
    (storage / job.run_name / NON_FINITE_FILE).unlink(missing_ok=True)  # a stop of an earlier attempt
    ensure_ray(ray_cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dataclasses.asdict(job),
        torch_config=torch_config(ray_cfg, tcfg.use_gpu, storage / job.run_name / "rendezvous"),
        scaling_config=ray.train.ScalingConfig(num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu),
        run_config=ray.train.RunConfig(
            name=job.run_name,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=tcfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tcfg.keep_checkpoints),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    stopped = storage / job.run_name / NON_FINITE_FILE
    if stopped.exists():
        raise NonFiniteLoss(json.loads(stopped.read_text()), storage / job.run_name)
    with result.checkpoint.as_directory() as d:
        weights, _, state = read_checkpoint(Path(d))
    return weights, state
