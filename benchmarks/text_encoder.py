"""Text-encoder cost: FLOPs per caption on a Gemma-2B-shaped model, and CPU time on the default base.

FLOPs (torch FlopCounterMode, meta device, nothing allocated), per caption of 32 tokens with K=6
prompts + 6 negated prompts:
  separate   - 2K separate passes over ``caption + prompt_i``
  masked     - one pass with the prompt-wise mask
  top_full   - cached trunk, top layer over every row
  top_rows   - cached trunk, top layer at the 2K readout rows only
  vanilla    - a CLIP ViT-B text transformer (width 512, 12 layers) over the caption
CPU time: one masked pass vs 2K batched separate passes on the bundled SmolLM2-135M (K=4).

Usage: python benchmarks/text_encoder.py [--skip-cpu] [--captions N] [--repeats R]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mpe.config import TextConfig, VanillaTextConfig
from mpe.model.base_model import resolve_base_model
from mpe.model.text.apt_tokens import add_apt_tokens
from mpe.model.text.lm_io import load_lm
from mpe.model.text.prompt_sequence import PromptLayout, build_batch, tokenize_captions
from mpe.model.text.tower import LLMTextTower
from mpe.model.text.vanilla_clip import VanillaCLIPTextTower

GEMMA_2B = dict(
    vocab_size=256000,
    hidden_size=2048,
    intermediate_size=16384,
    num_hidden_layers=18,
    num_attention_heads=8,
    num_key_value_heads=1,
    head_dim=256,
    max_position_embeddings=8192,
)


def count(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def gemma_flops(tokenizer, caption_tokens: int = 32, k: int = 6) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, GemmaConfig

    cfg = GemmaConfig(**GEMMA_2B)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
        tower = LLMTextTower(lm, tokenizer, TextConfig(num_prompts=k, negation=True), embed_dim=k * 128)
    caption = [tokenizer.bos_token_id] + [100 + i for i in range(caption_tokens - 1)]
    layout = tower.layout
    batch = build_batch([caption], layout, 0).to("meta")
    out = {}

    # Layer by layer (trunk + full top): the model's own forward inspects position ids with .item(),
    # which meta tensors cannot do; the tests show this path equals the model's forward.
    def full_pass(b):
        return tower.top(tower.trunk(b), b, rows_only=False)

    def separate():  # each segment alone after the caption: a plain causal pass
        for seg, reads in zip(layout.segments, layout.readouts):
            one = PromptLayout((seg,), (reads,), "none", 1)
            full_pass(build_batch([caption], one, 0).to("meta"))

    out["separate"] = count(separate)
    out["masked"] = count(lambda: full_pass(batch))
    states = torch.empty(1, batch.length, cfg.hidden_size, device="meta")
    out["top_full"] = count(lambda: tower.top(states, batch, rows_only=False))
    out["top_rows"] = count(lambda: tower.top(states, batch, rows_only=True))
    with torch.device("meta"):
        vanilla = VanillaCLIPTextTower(tokenizer, VanillaTextConfig(width=512, layers=12, heads=8), 512)
    ids = torch.zeros(1, caption_tokens + 1, dtype=torch.long, device="meta")

    def run_vanilla():
        x = vanilla.token_embedding(ids) + vanilla.positional_embedding[: ids.shape[1]]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(ids.shape[1], device="meta")
        vanilla.proj(vanilla.ln_final(vanilla.transformer(x, mask=mask, is_causal=True))[:, -1])

    out["vanilla"] = count(run_vanilla)
    return out


def cpu_timing(captions: int, repeats: int, k: int = 4) -> dict[str, float]:
    base = resolve_base_model("smollm2-135m")
    lm, tok = load_lm(base, "sdpa")
    add_apt_tokens(lm, tok, k)
    tower = LLMTextTower(lm, tok, TextConfig(num_prompts=k, negation=True), embed_dim=256).eval()
    caps = [
        f"a large red circle to the left of a small blue square number {i} on a striped background"
        for i in range(captions)
    ]
    ids = tokenize_captions(tok, caps, 64)
    batch = build_batch(ids, tower.layout, tower.pad_id)

    def separate():
        for seg in tower.layout.segments:
            rows = [c + list(seg) for c in ids]
            t = max(map(len, rows))
            x = torch.full((len(rows), t), tower.pad_id)
            m = torch.zeros((len(rows), t), dtype=torch.long)
            for i, r in enumerate(rows):
                x[i, t - len(r) :] = torch.tensor(r)
                m[i, t - len(r) :] = 1
            lm.model(input_ids=x, attention_mask=m, use_cache=False)

    def timed(fn):
        fn()  # warm-up
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    with torch.no_grad():
        res = {
            "separate_s": timed(separate),
            "masked_s": timed(lambda: tower.readouts(batch)),
            "trunk_fp32_s": timed(lambda: tower.trunk(batch)),
        }
        with torch.autocast("cpu", dtype=torch.bfloat16):
            res["trunk_bf16_s"] = timed(lambda: tower.trunk(batch))
    res["tokens_per_caption"] = batch.length
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--captions", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    base = resolve_base_model("smollm2-135m")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens(
        {"additional_special_tokens": [f"<APT-{i}>" for i in range(1, 7)]}, replace_extra_special_tokens=False
    )
    f = gemma_flops(tok)
    print("## FLOPs per caption (Gemma-2B-shaped, caption 32 tokens, K=6 + 6 negated)\n")
    print("| path | GFLOP |\n|---|---|")
    for name, label in [
        ("separate", "12 separate passes"),
        ("masked", "one masked pass"),
        ("top_full", "cached trunk + full top layer"),
        ("top_rows", "cached trunk + top layer at the 12 readout rows"),
        ("vanilla", "vanilla CLIP text tower (512 wide, 12 layers)"),
    ]:
        print(f"| {label} | {f[name] / 1e9:.1f} |")
    if args.skip_cpu:
        return
    torch.set_num_threads(torch.get_num_threads())
    r = cpu_timing(args.captions, args.repeats)
    print(
        f"\n## CPU time, SmolLM2-135M, {args.captions} captions, K=4 + 4 negated "
        f"({r['tokens_per_caption']} tokens per masked row), {torch.get_num_threads()} threads\n"
    )
    print(f"| path | seconds (median of {args.repeats}) |\n|---|---|")
    print(f"| 8 batched separate passes | {r['separate_s']:.2f} |")
    print(f"| one masked pass | {r['masked_s']:.2f} |")
    print(f"| ratio masked / separate | {r['masked_s'] / r['separate_s']:.2f} |")
    print(f"| trunk (29 layers), fp32 | {r['trunk_fp32_s']:.2f} ({args.captions / r['trunk_fp32_s']:.1f} captions/s) |")
    print(
        f"| trunk (29 layers), bf16 autocast | {r['trunk_bf16_s']:.2f} "
        f"({args.captions / r['trunk_bf16_s']:.1f} captions/s) |"
    )


if __name__ == "__main__":
    main()
