"""Cache storage dtypes: bytes per caption (the default, and Gemma-2B / Llama-3-8B shapes) and the effect
of each dtype on the default's test R@1/R@5 with the same seed.

Run from a project where `make run` has finished (data, base model and cache present). For each storage
dtype it writes a params file that differs only in ``cache.dtype`` and output folders, runs the
``cache``, ``train`` and ``evaluate`` stages, and tabulates the results. Writes
``metrics/cache_dtypes.json``.

Usage: python benchmarks/cache_dtypes.py [--project .] [--dtypes float16 bfloat16 float8_e4m3_row ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline_variant import run_variant_stages  # noqa: E402  (run as a script from benchmarks/)

ROOT = Path(__file__).resolve().parents[1]
# hidden width, and K=6 prompts + 6 negated prompts (the at-scale setting), with our templates
SHAPES = {"default (SmolLM2-135M, K=4+4)": 576, "Gemma-2B (K=6+6)": 2048, "Llama-3-8B (K=6+6)": 4096}


def bytes_per_caption(project: Path, dtypes: list[str]) -> list[dict]:
    """Mean rows per caption of the default data × hidden × bytes (plus float8 scales)."""
    sys.path.insert(0, str(ROOT))
    from mpe.cache.compute import trunk_info
    from mpe.cache.store import STORAGE
    from mpe.config import TextConfig, load_params
    from mpe.data.loader import split_captions
    from mpe.model.text.prompt_sequence import build_layout, tokenize_captions

    params = load_params(project / "params.yaml")
    info = trunk_info(project / params.base_model.out_dir, params.model.text)
    caps = split_captions(project / params.data.out_dir / "shards" / "train")
    lens = [len(i) for i in tokenize_captions(info.tokenizer, caps, params.model.text.max_caption_tokens)]
    cap = sum(lens) / len(lens)
    at_scale = TextConfig(num_prompts=6)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(project / params.base_model.out_dir)
    tok.add_special_tokens(
        {"additional_special_tokens": [f"<APT-{i}>" for i in range(1, 7)]}, replace_extra_special_tokens=False
    )
    seg6 = build_layout(tok, at_scale).segments_len
    rows = []
    for shape, hidden in SHAPES.items():
        r = cap + (info.layout.segments_len if shape.startswith("default") else seg6)
        row = {"shape": shape, "rows": r, "hidden": hidden}
        for d in dtypes:
            spec = STORAGE[d]
            row[d] = r * hidden * spec.itemsize + (4 * r if spec.scaling == "row" else 0)
        rows.append(row)
    return rows


def run_variant(project: Path, dtype: str) -> dict:
    tag = f"dtype-{dtype}"

    def change(p: dict) -> None:
        p["cache"].update(dtype=dtype, root=f"bench/{tag}/cache")

    base, recalls = run_variant_stages(project, tag, change)
    size = sum(p.stat().st_size for p in (project / base["cache"]["root"]).rglob("*.safetensors"))
    return {"dtype": dtype, "cache_bytes": size, **recalls}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--project", default=".")
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16", "float8_e4m3_row", "float8_e4m3_tensor"])
    ap.add_argument("--skip-training", action="store_true")
    args = ap.parse_args()
    project = Path(args.project).resolve()
    sizes = bytes_per_caption(project, args.dtypes)
    print("| shape | rows per caption | hidden | " + " | ".join(f"{d} (KB)" for d in args.dtypes) + " |")
    print("|---|---|---|" + "---|" * len(args.dtypes))
    for r in sizes:
        print(
            f"| {r['shape']} | {r['rows']:.0f} | {r['hidden']} | "
            + " | ".join(f"{r[d] / 1024:.1f}" for d in args.dtypes)
            + " |"
        )
    results = [] if args.skip_training else [run_variant(project, d) for d in args.dtypes]
    if results:
        print(
            "\n| storage dtype | cache on disk (MB) | t→i R@1 | t→i R@5 | i→t R@1 | i→t R@5 |\n"
            "|---|---|---|---|---|---|"
        )
        for r in results:
            print(
                f"| {r['dtype']} | {r['cache_bytes'] / 1e6:.1f} | {r['text_to_image_R@1']:.3f} | "
                f"{r['text_to_image_R@5']:.3f} | {r['image_to_text_R@1']:.3f} | {r['image_to_text_R@5']:.3f} |"
            )
    out = project / "metrics" / "cache_dtypes.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bytes_per_caption": sizes, "results": results}, indent=1))


if __name__ == "__main__":
    main()
