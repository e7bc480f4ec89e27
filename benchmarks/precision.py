"""bf16 against fp32, measured: the error of bf16-autocast trunk states (what the cache stores) against
fp32 ones on the default's texts, and the default's test R@1/R@5 for each combination of cache and
training precision (same seed, cache/train/evaluate rerun for each). Run in a project after `make run`.
Writes ``metrics/precision.json``.

Usage: python benchmarks/precision.py [--project .] [--texts 64] [--skip-training]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from pipeline_variant import run_variant_stages  # noqa: E402  (run as a script from benchmarks/)

ROOT = Path(__file__).resolve().parents[1]


def state_error(project: Path, n: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from mpe.cache.compute import load_trunk_tower, trunk_states_of_ids
    from mpe.config import load_params
    from mpe.data.loader import split_captions
    from mpe.model.text.prompt_sequence import tokenize_captions

    params = load_params(project / "params.yaml")
    tower = load_trunk_tower(project / params.base_model.out_dir, params.model.text)
    texts = list(dict.fromkeys(split_captions(project / params.data.out_dir / "shards" / "train")))[:n]
    ids = tokenize_captions(tower.tokenizer, texts, params.model.text.max_caption_tokens)
    fp32 = trunk_states_of_ids(tower, ids, None)
    bf16 = trunk_states_of_ids(tower, ids, torch.bfloat16)
    rel = [((b - a).norm(dim=-1) / a.norm(dim=-1)) for a, b in zip(fp32, bf16)]
    allrel = torch.cat(rel)
    fp16 = [(a.half().float() - a).norm(dim=-1) / a.norm(dim=-1) for a in fp32]
    return {
        "texts": len(texts),
        "rows": int(allrel.numel()),
        "mean_relative_error": allrel.mean().item(),
        "max_relative_error": allrel.max().item(),
        "fp16_storage_mean_relative_error": torch.cat(fp16).mean().item(),
    }


def run_variant(project: Path, cache: str, train: str, seed: int = 0) -> dict:
    tag = f"cache-{cache}-train-{train}" + (f"-seed{seed}" if seed else "")

    def change(p: dict) -> None:
        p["seed"] = seed
        p["cache"].update(autocast=cache, root="bench/precision-cache")
        p["train"]["autocast"] = train

    _, recalls = run_variant_stages(project, tag, change)
    return {"cache": cache, "train": train, "seed": seed, **recalls}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--project", default=".")
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument(
        "--combos",
        nargs="+",
        default=["none/none", "bfloat16/none", "none/bfloat16", "bfloat16/bfloat16"],
        help="cache/train compute precisions (none = fp32)",
    )
    args = ap.parse_args()
    project = Path(args.project).resolve()
    err = state_error(project, args.texts)
    print(
        f"bf16 autocast trunk states vs fp32, {err['texts']} captions ({err['rows']} rows): relative error "
        f"mean {err['mean_relative_error']:.4f}, max {err['max_relative_error']:.4f} "
        f"(float16 storage alone: mean {err['fp16_storage_mean_relative_error']:.5f})"
    )
    results = []
    if not args.skip_training:
        for combo in args.combos:
            cache, train = combo.split("/")
            results += [run_variant(project, cache, train, seed) for seed in args.seeds]
        name = lambda m: "bf16" if m == "bfloat16" else "fp32"  # noqa: E731
        keys = ("text_to_image_R@1", "text_to_image_R@5", "image_to_text_R@1", "image_to_text_R@5")
        print(f"\nseeds {args.seeds}: mean ± std\n")
        print("| cache compute | train compute | t→i R@1 | t→i R@5 | i→t R@1 | i→t R@5 |\n|---|---|---|---|---|---|")
        for combo in args.combos:
            rs = [r for r in results if f"{r['cache']}/{r['train']}" == combo]
            cells = []
            for k in keys:
                vals = torch.tensor([r[k] for r in rs])
                cells.append(f"{vals.mean():.3f} ± {vals.std():.3f}" if len(rs) > 1 else f"{vals[0]:.3f}")
            print(f"| {name(rs[0]['cache'])} | {name(rs[0]['train'])} | " + " | ".join(cells) + " |")
    out = project / "metrics" / "precision.json"
    out.write_text(json.dumps({"state_error": err, "results": results}, indent=1))


if __name__ == "__main__":
    main()
