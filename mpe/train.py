"""The train stage: Ray Train ``TorchTrainer`` over the webdataset shards and the hidden-state cache.

Every worker builds the same model (same seed), reads its own shards, embeds its local batch, and
computes its local loss against the global batch gathered with gradient; gradients are then
averaged across workers. Rank 0 checkpoints every ``checkpoint_every`` steps and logs to MLflow.
A rerun with the same ``run_name`` and ``storage_path`` resumes from the last checkpoint, and
``FailureConfig(max_failures)`` restarts failed workers from it. The driver turns the final
checkpoint into a ``MultiPromptCLIP`` folder in ``out_dir``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch

STATE_FILE, TRAINABLE_FILE, OPTIM_FILE = "state.json", "trainable.safetensors", "optim.pt"


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    unknown = [k for k in state if k not in params]
    if unknown:
        raise KeyError(f"checkpoint holds parameters this model lacks: {unknown[:5]}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def save_checkpoint_dir(folder: Path, model, optimizer, scheduler, state: dict) -> None:
    from safetensors.torch import save_file

    save_file(trainable_state(model), str(folder / TRAINABLE_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, folder / OPTIM_FILE)
    (folder / STATE_FILE).write_text(json.dumps(state))


def read_checkpoint_dir(folder: Path) -> tuple[dict, dict, dict]:
    from safetensors.torch import load_file

    optim = torch.load(folder / OPTIM_FILE, weights_only=True)  # our own file; tensors and numbers only
    return load_file(str(folder / TRAINABLE_FILE)), optim, json.loads((folder / STATE_FILE).read_text())


def allreduce_mean_(params) -> None:
    """Average the gradients of ``params`` over all workers (in one flat buffer)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def build_model(params, base_dir: Path):
    from mpe.model import MultiPromptCLIP

    torch.manual_seed(params.seed)  # identical initial weights on every worker
    return MultiPromptCLIP.from_base(base_dir, params.model, trust_remote_code=params.base_model.trust_remote_code,
                                     provenance={"base_model_name": params.base_model.name})


def _mlflow_start(params, cfg: dict, run_id: str | None, ray_run_name: str) -> str:
    import mlflow

    mlflow.set_tracking_uri(cfg["tracking_uri"])
    exp = mlflow.get_experiment_by_name(params.mlflow.experiment)
    if exp is None:
        mlflow.create_experiment(params.mlflow.experiment, artifact_location=cfg["artifact_location"])
    mlflow.set_experiment(params.mlflow.experiment)
    if run_id:
        mlflow.start_run(run_id=run_id)
        return run_id
    run = mlflow.start_run(run_name=ray_run_name)
    mlflow.log_params(flatten_params(params))
    mlflow.set_tags({"ray_run_name": ray_run_name, "mpe.stage": "train"})
    return run.info.run_id


def flatten_params(params) -> dict[str, str]:
    """``section.key: value`` for every leaf of the params (what MLflow shows and compares)."""
    out = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = str(obj)[:500]

    walk("", params.model_dump(mode="json", exclude={"mlflow", "ray"}))
    return out


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train

    from mpe.cache import HiddenStateCache
    from mpe.config import Params
    from mpe.data.loader import train_stream
    from mpe.losses import Dist
    from mpe.objective import model_loss, text_from_cache
    from mpe.optim import build_optimizer, build_scheduler

    params = Params.model_validate_json(config["params"])
    tcfg = params.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(tcfg.threads_per_worker or max(1, (os.cpu_count() or 2) // world))
    device = torch.device("cuda" if tcfg.use_gpu and torch.cuda.is_available() else "cpu")
    model = build_model(params, Path(config["base_dir"])).to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, tcfg.lr, tcfg.weight_decay)
    total = config["total_steps"]
    scheduler = build_scheduler(optimizer, tcfg.warmup_steps, total)
    state = {"step": 0, "history": [], "mlflow_run_id": None, "restored_from_step": None}
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            weights, optim, state = read_checkpoint_dir(Path(d))
        load_trainable(model, weights)
        optimizer.load_state_dict(optim["optimizer"])
        scheduler.load_state_dict(optim["scheduler"])
        state["restored_from_step"] = state["step"]
    cache = HiddenStateCache(Path(config["cache_folder"]), config["cache_fields"]) if config["cache_folder"] else None
    if rank == 0 and config["mlflow"]:
        state["mlflow_run_id"] = _mlflow_start(params, config["mlflow"], state.get("mlflow_run_id"),
                                               config["run_name"])
        if state["restored_from_step"] is not None:
            import mlflow

            mlflow.log_metric("restored_from_step", state["restored_from_step"], step=state["step"])
    stream = train_stream(config["train_shards"], rank, world, params.seed, epoch=state["step"])
    dist = Dist(rank, world)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    fail_marker = Path(config["fail_marker"])
    while state["step"] < total:
        step = state["step"]
        if tcfg.fail_at_step is not None and step == tcfg.fail_at_step and rank == world - 1 \
                and not fail_marker.exists():
            fail_marker.write_text(f"injected failure at step {step}")
            raise RuntimeError(f"injected worker failure at step {step} (train.fail_at_step)")
        samples = [next(stream) for _ in range(tcfg.batch_size)]
        pixels = model.pixel_values([s.image for s in samples])
        captions = [s.caption for s in samples]
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            if cache is not None:
                states, lens = cache.batch(captions)
                text = text_from_cache(model, states.to(device), lens)
            else:
                text = model.text_features(captions)
            terms = model_loss(model, pixels, text, dist)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        allreduce_mean_(trainable)
        torch.nn.utils.clip_grad_norm_(trainable, tcfg.grad_clip)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(params.model.loss.max_logit_scale))
        state["step"] = step + 1
        row = {"step": step + 1, "loss": terms.total.item(), "contrastive": terms.contrastive.item(),
               "diversity": terms.diversity.item(), "negation": terms.negation.item(),
               "lr": scheduler.get_last_lr()[0], "logit_scale": model.logit_scale.exp().item()}
        state["history"].append(row)
        if rank == 0 and config["mlflow"] and (step + 1) % tcfg.log_every == 0:
            import mlflow

            mlflow.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step + 1)
        if (step + 1) % tcfg.checkpoint_every == 0 or step + 1 == total:
            _report(row, model, optimizer, scheduler, state, rank)
    if rank == 0 and config["mlflow"]:
        import mlflow

        mlflow.end_run()


def _report(row, model, optimizer, scheduler, state, rank) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(row, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint_dir(Path(d), model, optimizer, scheduler, state)
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(d))


def count_train_samples(data_root: Path) -> int:
    stats = data_root / "stats.json"
    if stats.exists():
        return int(json.loads(stats.read_text())["splits"]["train"]["successes"])
    from mpe.data.loader import split_captions

    return len(split_captions(data_root / "shards" / "train"))


# Settings that do not change what a step computes: a rerun that differs only in these resumes.
RESUMABLE_TRAIN_KEYS = {"run_name", "storage_path", "out_dir", "epochs", "max_steps", "checkpoint_every",
                        "keep_checkpoints", "max_failures", "fail_at_step", "log_every", "save_dtype",
                        "threads_per_worker"}


def run_fingerprint(params, data_stats: dict | None, cache_fields: dict | None) -> str:
    """Hash of everything that shapes the training trajectory (model, seed, data, cache, optimiser)."""
    import hashlib

    train = {k: v for k, v in params.train.model_dump(mode="json").items() if k not in RESUMABLE_TRAIN_KEYS}
    blob = {"seed": params.seed, "model": params.model.model_dump(mode="json"), "train": train,
            "base_model": params.base_model.model_dump(mode="json"), "data": data_stats, "cache": cache_fields}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:8]


def effective_run_name(params, data_stats: dict | None, cache_fields: dict | None) -> str:
    """``<run_name>-<fingerprint>``: the same inputs resume the same Ray run; new inputs start afresh
    instead of silently continuing a run trained on something else."""
    return f"{params.train.run_name}-{run_fingerprint(params, data_stats, cache_fields)}"


def run_train_stage(params) -> dict:
    """Train with Ray Train and write the model folder to ``train.out_dir``; returns a summary."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from mpe.atomic import write_text
    from mpe.cache import cache_fields_for, load_text_tower
    from mpe.ray_cluster import ensure_ray, torch_config

    tcfg = params.train
    base_dir = Path(params.base_model.out_dir).resolve()
    data_root = Path(params.data.out_dir).resolve()
    n_train = count_train_samples(data_root)
    steps_per_epoch = math.ceil(n_train / (tcfg.batch_size * tcfg.num_workers))
    total = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * steps_per_epoch))
    cache_folder, cache_fields = None, None
    if params.cache.enabled:
        tower = load_text_tower(params, base_dir)
        cache_fields = cache_fields_for(params, tower, base_dir)
        from mpe.cache import HiddenStateCache

        cache = HiddenStateCache.for_config(Path(params.cache.root).resolve(), cache_fields)
        missing = cache.missing(_train_captions(data_root))
        if missing:
            raise RuntimeError(f"{cache.folder} lacks {len(missing)} training captions; run `mpe cache` first")
        cache_folder = str(cache.folder)
        del tower
    storage = Path(tcfg.storage_path).resolve()
    stats_file = data_root / "stats.json"
    run_name = effective_run_name(params, json.loads(stats_file.read_text()) if stats_file.exists() else None,
                                  cache_fields)
    mlflow_cfg = mlflow_settings(params)
    config = {"params": params.model_dump_json(), "base_dir": str(base_dir), "total_steps": total,
              "train_shards": str(data_root / "shards" / "train"), "cache_folder": cache_folder,
              "cache_fields": cache_fields, "mlflow": mlflow_cfg,
              "fail_marker": str(storage / run_name / ".injected_failure"), "run_name": run_name}
    (storage / run_name).mkdir(parents=True, exist_ok=True)
    ensure_ray(params.ray)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=config,
        torch_config=torch_config(params.ray, tcfg.use_gpu, storage / run_name / "rendezvous"),
        scaling_config=ray.train.ScalingConfig(num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=tcfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tcfg.keep_checkpoints)))
    result = trainer.fit()
    if result.error:
        raise result.error
    model = build_model(params, base_dir)
    with result.checkpoint.as_directory() as d:
        weights, _, state = read_checkpoint_dir(Path(d))
    load_trainable(model, weights)
    model.provenance.update({"ray_run_name": run_name, "mlflow_run_id": state.get("mlflow_run_id"),
                             "steps": state["step"]})
    _save_trained(model, Path(tcfg.out_dir), tcfg.save_dtype)
    metrics_dir = Path(params.evaluate.out_dir)
    write_text(metrics_dir / "train_history.json", json.dumps(state["history"]))
    final = state["history"][-1] if state["history"] else {}
    summary = {"steps": state["step"], "total_steps": total, "train_samples": n_train,
               "final_loss": final.get("loss"), "restored_from_step": state.get("restored_from_step"),
               "mlflow_run_id": state.get("mlflow_run_id"), "ray_run_name": run_name}
    write_text(metrics_dir / "train.json", json.dumps(summary, indent=1))
    if mlflow_cfg and state.get("mlflow_run_id"):
        summary["model_uri"] = _log_final_model(mlflow_cfg, state["mlflow_run_id"], Path(tcfg.out_dir),
                                                metrics_dir, params.model.embed_dim)
        write_text(metrics_dir / "train.json", json.dumps(summary, indent=1))
    return summary


def _train_captions(data_root: Path) -> list[str]:
    from mpe.data.loader import split_captions

    return split_captions(data_root / "shards" / "train")


def _save_trained(model, out: Path, save_dtype: str) -> None:
    """Save with the LLM in ``save_dtype`` (its trunk came from a checkpoint of that precision)."""
    if save_dtype == "bfloat16" and hasattr(model.text, "lm"):
        model.text.lm.to(torch.bfloat16)
    model.save_pretrained(out)


def mlflow_settings(params) -> dict | None:
    """Absolute tracking URI and artifact location (workers may run in another directory)."""
    uri = params.mlflow.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    root = params.mlflow.artifact_root
    location = root if "://" in root else Path(root).resolve().as_uri()
    return {"tracking_uri": uri, "artifact_location": location}


def _log_final_model(mlflow_cfg: dict, run_id: str, model_dir: Path, metrics_dir: Path, embed_dim: int) -> str:
    """Log the trained folder as the pyfunc (models from code) in rank 0's run; returns its URI."""
    import mlflow

    from mpe.registry import log_pyfunc

    mlflow.set_tracking_uri(mlflow_cfg["tracking_uri"])
    with mlflow.start_run(run_id=run_id):
        uri = log_pyfunc(model_dir, embed_dim)
        hist = metrics_dir / "train_history.json"
        if hist.exists():
            from mpe.plots import loss_curves

            png = loss_curves(json.loads(hist.read_text()), Path(tempfile.mkdtemp()) / "loss.png")
            mlflow.log_artifact(str(png), artifact_path="plots")
    return uri
