"""Every heavy stage of a finished run against this machine's peak: the work it did (FLOPs counted with
FlopCounterMode on a sample and scaled), its time (from the stage's own metrics), and the achieved share
of the measured peak of the precision it ran in (``metrics/peak.json``, from ``benchmarks/peak.py``).
Run in a project after `make run`.

Usage: python benchmarks/stages.py [--project .]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--project", default=".")
    ap.add_argument("--sample", type=int, default=64)
    args = ap.parse_args()
    from peak import load_peak
    from train_step import _setup

    from mpe.cache.compute import load_trunk_tower, trunk_states_of_ids
    from mpe.data.evaluation_sets import evaluation_texts
    from mpe.data.loader import split_captions
    from mpe.model.text.prompt_sequence import tokenize_captions
    from mpe.runtime.precision import torch_dtype
    from mpe.training.optim import build_optimizer, build_scheduler
    from mpe.training.step import Batch, train_step

    peak = load_peak()
    project = Path(args.project).resolve()
    params, model, batch = _setup(project)  # chdir to the project
    cache = json.loads((Path(params.evaluate.out_dir) / "cache.json").read_text())
    train = json.loads((Path(params.evaluate.out_dir) / "train.json").read_text())
    rows = []

    texts = list(dict.fromkeys(split_captions(Path(params.data.out_dir) / "shards" / "train")))
    texts += list(dict.fromkeys(evaluation_texts(params.data.out_dir)))
    tower = load_trunk_tower(Path(params.base_model.out_dir), params.model.text)
    ids = tokenize_captions(tower.tokenizer, texts, params.model.text.max_caption_tokens)
    sample = ids[:: max(1, len(ids) // args.sample)][: args.sample]
    autocast = torch_dtype(cache["compute_dtype"]) if cache["compute_dtype"] == "bfloat16" else None
    with FlopCounterMode(display=False) as fc:
        trunk_states_of_ids(tower, sample, autocast)
    cache_flops = fc.get_total_flops() / len(sample) * cache["texts_computed"]
    p = peak["bf16_flops" if autocast else "fp32_flops"]
    rows.append(
        (
            "cache",
            f"{cache['texts_computed']} texts through the trunk ({cache['compute_dtype']})",
            cache["compute_seconds"],
            cache_flops,
            p,
        )
    )

    torch.set_num_threads(1)
    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = build_optimizer(model, params.train.lr, params.train.weight_decay)
    sched = build_scheduler(opt, params.train.warmup_steps, 1000)
    b = Batch(
        model.vision.transform.normalize(batch["pixels"]),
        states=batch["states"].float(),
        caption_lens=batch["caption_lens"].tolist(),
    )
    step_autocast = torch.bfloat16 if train.get("compute_dtype") == "bfloat16" else None
    with FlopCounterMode(display=False) as fc:
        train_step(model, b, opt, sched, trainable, params.train.grad_clip, autocast=step_autocast)
    workers = params.train.num_workers
    steps = train["steps"] - (train.get("restored_from_step") or 0)
    train_flops = fc.get_total_flops() * steps * workers
    p = peak["bf16_flops" if step_autocast else "fp32_flops"]
    rows.append(
        (
            "train (steps)",
            f"{steps} steps × {workers} workers × {params.train.batch_size} samples ({train.get('compute_dtype')})",
            train["seconds"]["steps"],
            train_flops,
            p,
        )
    )

    print(
        f"peak ({peak['threads']} threads): fp32 {peak['fp32_flops'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {peak['bf16_flops'] / 1e9:.0f} GFLOP/s\n"
    )
    print("| stage | work | seconds | GFLOP | achieved GFLOP/s | share of peak |\n|---|---|---|---|---|---|")
    out = []
    for stage, work, secs, flops, pk in rows:
        print(
            f"| {stage} | {work} | {secs:.1f} | {flops / 1e9:,.0f} | {flops / secs / 1e9:,.0f} | "
            f"{flops / secs / pk:.0%} |"
        )
        out.append({"stage": stage, "work": work, "seconds": secs, "flops": flops, "share_of_peak": flops / secs / pk})
    print(
        f"\ntrain stage outside the steps (Ray start, worker set-up, export, model logging): "
        f"{train['seconds']['outside_steps']:.1f} s of {train['seconds']['total']:.1f} s"
    )
    os.makedirs("metrics", exist_ok=True)
    Path("metrics/stages.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
