"""One training step of the default, measured and taken apart: FLOPs (FlopCounterMode), seconds, the
share of the measured peak, and where the time goes (torch profiler regions: text top, vision tower
and loss forward, backward, gradient all-reduce, optimiser), in fp32 and under bf16 autocast.

Run in a project after `make run` (it reads the base model, the data shards and the cache). A single
process with ``--threads`` threads stands for one Ray Train worker (the default gives each of its 2
workers one thread of the 2 cores); the all-reduce is measured between 2 real gloo processes.

Usage: python benchmarks/train_step.py [--project .] [--threads 1] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _setup(project: Path):
    from mpe.cache.compute import cache_fields
    from mpe.cache.store import open_active
    from mpe.config import load_params
    from mpe.data.train_stream import StreamSpec, TrainLoader
    from mpe.files import storage
    from mpe.model.multi_prompt_clip import MultiPromptCLIP

    os.chdir(project)
    params = load_params("params.yaml")
    base = Path(params.base_model.out_dir)
    folder = open_active(params.cache.root, cache_fields(base, params.model.text, params.cache.dtype))
    data = storage.list_files(storage.join(params.data.out_dir, "shards", "train"), ".tar")
    spec = StreamSpec(
        tuple(data),
        tuple(folder.shard_url("train", d) for d in data),
        params.train.batch_size,
        params.model.vision.image_size,
        64,
        params.seed,
        workers=0,
    )
    batch = next(TrainLoader(spec))
    model = MultiPromptCLIP.from_base(base, params.model, seed=params.seed).train()
    return params, model, batch


def _allreduce_worker(rank: int, numel: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    x = torch.randn(numel)
    dist.all_reduce(x)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        dist.all_reduce(x)
        times.append(time.perf_counter() - t)
    if rank == 0:
        Path(out).write_text(json.dumps(min(times)))
    dist.destroy_process_group()


def allreduce_seconds(numel: int) -> float:
    d = Path(tempfile.mkdtemp())
    mp.spawn(_allreduce_worker, args=(numel, str(d / "store"), str(d / "out")), nprocs=2, join=True)
    return json.loads((d / "out").read_text())


def measure(params, model, batch, autocast, steps: int) -> dict:
    from mpe.training.optim import build_optimizer, build_scheduler
    from mpe.training.step import Batch, train_step

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, params.train.lr, params.train.weight_decay)
    sched = build_scheduler(opt, params.train.warmup_steps, 10_000)
    b = Batch(
        model.vision.transform.normalize(batch["pixels"]),
        states=batch["states"].float(),
        caption_lens=batch["caption_lens"].tolist(),
    )
    step = lambda: train_step(model, b, opt, sched, trainable, params.train.grad_clip, autocast=autocast)  # noqa: E731
    step()
    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    regions = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key.startswith("mpe.")}
    return {"flops": flops, "seconds": min(times), "regions": regions, "trainable": sum(p.numel() for p in trainable)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--project", default=".")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    from peak import load_peak

    peak = load_peak()
    torch.set_num_threads(args.threads)
    params, model, batch = _setup(Path(args.project).resolve())
    share = args.threads / peak.threads  # the peak was measured on every core
    rows = {}
    for name, autocast in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
        r = measure(params, model, batch, autocast, args.steps)
        p = (peak.flops["bfloat16"] if autocast else peak.flops["float32"]) * share
        r["fraction_of_peak"] = r["flops"] / r["seconds"] / p
        rows[name] = r
    reduce_s = allreduce_seconds(rows["fp32"]["trainable"])
    print(
        f"step of {params.train.batch_size} samples per worker, {args.threads} thread(s); "
        f"{rows['fp32']['flops'] / 1e9:.1f} GFLOP per step; {rows['fp32']['trainable'] / 1e6:.2f} M trainable"
    )
    print("\n| precision | seconds / step | GFLOP/s | share of that precision's peak |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds']:.3f} | {r['flops'] / r['seconds'] / 1e9:.0f} | {r['fraction_of_peak']:.0%} |")
    print("\n| region (profiler, one step) | fp32 s | bf16 autocast s |\n|---|---|---|")
    for key in rows["fp32"]["regions"]:
        print(f"| {key} | {rows['fp32']['regions'][key]:.3f} | {rows['bf16 autocast']['regions'].get(key, 0):.3f} |")
    print(
        f"| gradient all-reduce (2 gloo processes, {rows['fp32']['trainable'] / 1e6:.2f} M floats) | "
        f"{reduce_s:.3f} | {reduce_s:.3f} |"
    )
    out = ROOT / "metrics" / "train_step.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "allreduce_s": reduce_s, "threads": args.threads}, indent=1, default=str))


if __name__ == "__main__":
    main()
