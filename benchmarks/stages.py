"""Every compute stage of a finished run against this machine's peak: the FLOPs it did (counted by the planner
from the model's config and the run's own corpus, ``mpe.planning``), its time (from the stage's own metrics),
and the achieved share of the peak of the precision it ran in. The peak is read from a ``peak.json`` that
``benchmarks/peak.py`` wrote in the same session (under the same lock) as the run.

Usage: python benchmarks/stages.py --project DIR --peak PEAK.json [--out metrics/stages.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def stage_figures(project: Path, peak) -> dict:
    """The cache's and the training steps' FLOPs, seconds, achieved FLOP/s and share of the peak, and the
    train stage's time outside the steps, for the project run in ``project``."""
    from mpe.config import load_params
    from mpe.planning.corpus import from_shards
    from mpe.planning.work import count_model_work, model_source
    from mpe.records import CACHE, read_metrics
    from mpe.records import TrainingSummary as Summary

    os.chdir(project)
    params = load_params("params.yaml")
    text = params.model.text
    lm_config, tokenizer, _ = model_source(params.base_model, text)
    corpus = from_shards(params.data.out_dir, tokenizer, text.max_caption_tokens)
    cache = read_metrics(params.metrics_dir, CACHE)
    train = Summary.read(params.metrics_dir)
    tokens = round(corpus.train.mean_tokens)
    work = count_model_work(lm_config, tokenizer, params.model, tokens, params.train.batch_size)
    out = {"peak": peak.to_json()}
    if cache.get("texts_computed"):
        if cache["shards_computed"] != cache["data_shards"]:
            raise SystemExit("the cache stage reused shards: run on a cold cache (a fresh clone)")
        tr, ev = corpus.train, corpus.eval_texts
        flops = work.trunk_flops_sum(tr.texts, tr.tokens, tr.tokens_sq)
        flops += work.trunk_flops_sum(ev.texts, ev.tokens, ev.tokens_sq)
        secs = cache.get("trunk_seconds", cache["compute_seconds"])
        out["cache"] = _row(
            f"{cache['texts_computed']} texts through the trunk", flops, secs, peak, cache["compute_dtype"]
        )
        out["cache"]["stage_seconds"] = cache["compute_seconds"]
    steps = train.steps - (train.restored_from_step or 0)
    global_batch = params.train.batch_size * params.train.num_workers
    flops = work.train_flops_per_sample * global_batch * steps
    out["train_steps"] = _row(
        f"{steps} steps × {global_batch} samples", flops, train.seconds["steps"], peak, train.compute_dtype
    )
    out["train_outside_steps_s"] = train.seconds["outside_steps"]
    out["train_seconds"] = train.seconds
    return out


def _row(work: str, flops: float, seconds: float, peak, precision: str) -> dict:
    achieved = flops / seconds
    return {
        "work": work,
        "flops": flops,
        "seconds": seconds,
        "achieved_flops": achieved,
        "precision": precision,
        "share_of_peak": achieved / peak.flops[precision],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--project", required=True)
    ap.add_argument("--peak", required=True, help="peak.json from benchmarks/peak.py, measured in the same session")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from mpe.runtime.peak import read_peak

    peak = read_peak(Path(args.peak).resolve())
    out_path = Path(args.out).resolve() if args.out else None
    fig = stage_figures(Path(args.project).resolve(), peak)
    print(
        f"peak ({peak.threads} threads): fp32 {peak.flops['float32'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {peak.flops['bfloat16'] / 1e9:.0f} GFLOP/s\n"
    )
    print("| stage | work | seconds | GFLOP | achieved GFLOP/s | share of peak |\n|---|---|---|---|---|---|")
    for name in ("cache", "train_steps"):
        if name in fig:
            r = fig[name]
            print(
                f"| {name} | {r['work']} ({r['precision']}) | {r['seconds']:.1f} | {r['flops'] / 1e9:,.0f} | "
                f"{r['achieved_flops'] / 1e9:,.1f} | {r['share_of_peak']:.0%} of {r['precision']} |"
            )
    print(f"\ntrain stage outside the steps: {fig['train_outside_steps_s']:.1f} s ({fig['train_seconds']})")
    if out_path:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(fig, indent=1))


if __name__ == "__main__":
    main()
