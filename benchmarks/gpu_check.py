"""GPU checks, nothing downloaded: a random-init Gemma-2B-shaped trunk built from its config.

1. cache stage: captions/s and MFU of the trunk (one masked pass, K=6 + 6 negated prompts) in bf16;
2. training: a step of the cached-trunk model (the top layer, a ViT-B/16 image tower at 224 px) at a
   global batch of 1024 on one GPU, through Ray Train with NCCL: samples/s, MFU, peak memory;
3. one masked pass against 12 separate ``caption + prompt_i`` passes: the time ratio.

MFU divides counted FLOPs (FlopCounterMode) per second by the device's bf16 matmul peak, measured
here. ``--toy`` runs the same code at toy size on the CPU (gloo instead of NCCL): what `make test`
does. Writes JSON (default ``metrics/gpu_check.json``).

Usage: python benchmarks/gpu_check.py [--toy] [--out metrics/gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
TOY = dict(
    vocab_size=49160,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=512,
)
VIT_B16 = dict(image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)
VIT_TOY = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int = 3) -> float:
    fn()
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def peak_bf16(device: str, n: int) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    return 2 * n**3 / timed(lambda: a @ b, device, 5)


def tokenizer_with_apt(k: int):
    from transformers import AutoTokenizer

    from mpe.model.base_model import resolve_base_model

    tok = AutoTokenizer.from_pretrained(resolve_base_model("smollm2-135m"))
    tok.add_special_tokens(
        {"additional_special_tokens": [f"<APT-{i}>" for i in range(1, k + 1)]}, replace_extra_special_tokens=False
    )
    return tok


def text_tower(toy: bool, device: str, k: int = 6):
    from transformers import AutoModelForCausalLM, GemmaConfig

    from mpe.config import TextConfig
    from mpe.model.text.tower import LLMTextTower

    tok = tokenizer_with_apt(k)
    cfg = GemmaConfig(**(TOY if toy else GEMMA_2B))
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    return LLMTextTower(lm, tok, TextConfig(num_prompts=k, negation=True), embed_dim=k * 128).eval(), tok


@torch.no_grad()
def cache_check(toy: bool, device: str, peak: float) -> dict:
    from mpe.model.text.prompt_sequence import PromptLayout, build_batch

    tower, tok = text_tower(toy, device)
    n = 8 if toy else 256
    captions = [[tok.bos_token_id] + [100 + (i * 7 + j) % 5000 for j in range(31)] for i in range(n)]
    batch = build_batch(captions, tower.layout, tower.pad_id).to(device)

    def trunk():
        with torch.autocast(device, dtype=torch.bfloat16):
            tower.trunk(batch)

    with FlopCounterMode(display=False) as fc:
        trunk()
    s = timed(trunk, device)
    out = {
        "captions_per_s": n / s,
        "mfu": fc.get_total_flops() / s / peak,
        "batch": n,
        "tokens_per_caption": batch.length,
    }

    def masked():
        with torch.autocast(device, dtype=torch.bfloat16):
            tower.readouts(batch)

    def separate():
        with torch.autocast(device, dtype=torch.bfloat16):
            for seg, reads in zip(tower.layout.segments, tower.layout.readouts):
                one = PromptLayout((seg,), (reads,), "none", 1)
                b = build_batch(captions, one, tower.pad_id).to(device)
                tower.decoder.full_forward(
                    b.input_ids, tower.decoder.masks(b.segment_ids, b.position_ids, torch.bfloat16), b.position_ids
                )

    out["masked_over_separate"] = timed(masked, device) / timed(separate, device)
    return out


def _train_loop(config: dict) -> None:
    import ray.train

    from mpe.config import ModelConfig
    from mpe.model.losses import Dist
    from mpe.model.multi_prompt_clip import MultiPromptCLIP
    from mpe.model.vision.tower import VisionTower
    from mpe.training.optim import build_optimizer, build_scheduler
    from mpe.training.step import Batch, train_step

    toy, device = config["toy"], "cuda" if config["gpu"] else "cpu"
    ctx = ray.train.get_context()
    tower, _ = text_tower(toy, device)  # K=6 + 6 negated, D = 6 × 128
    tower.lm.float()  # fp32 master weights; the step runs under bf16 autocast
    cfg = ModelConfig(embed_dim=768, text={"num_prompts": 6}, vision=VIT_TOY if toy else VIT_B16)
    model = MultiPromptCLIP(cfg, tower, VisionTower(cfg.vision, cfg.embed_dim)).to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, 1e-4, 0.1)
    sched = build_scheduler(opt, 10, 1000)
    b, size, hidden = config["batch"], cfg.vision.image_size, tower.decoder.hidden_size
    lens = [32] * b
    rows = 32 + tower.layout.segments_len
    batch = Batch(
        torch.randn(b, 3, size, size, device=device),
        states=torch.randn(b, rows, hidden, device=device),
        caption_lens=lens,
    )
    step = lambda: train_step(
        model,
        batch,
        opt,
        sched,
        trainable,
        1.0,  # noqa: E731
        Dist(ctx.get_world_rank(), ctx.get_world_size()),
        torch.bfloat16,
    )
    step()
    with FlopCounterMode(display=False) as fc:
        step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    s = timed(step, device)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    if ctx.get_world_rank() == 0:  # metrics reported without a checkpoint are not kept: a file carries them
        Path(config["out"]).write_text(
            json.dumps(
                {
                    "samples_per_s": b / s,
                    "flops_per_step": fc.get_total_flops(),
                    "seconds_per_step": s,
                    "peak_memory_gib": mem,
                }
            )
        )


def train_check(toy: bool, gpu: bool, peak: float, batch: int) -> dict:
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from mpe.config import RayConfig
    from mpe.runtime.ray_cluster import ensure_ray, torch_config

    ensure_ray(RayConfig(num_cpus=None if gpu else 2))
    tc = TorchConfig(backend="nccl") if gpu else torch_config(RayConfig(), False, Path("/tmp/mpe-gpu-check-store"))
    out = Path(tempfile.mkdtemp()) / "train.json"
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"toy": toy, "gpu": gpu, "batch": batch, "out": str(out)},
        torch_config=tc,
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=gpu),
        run_config=ray.train.RunConfig(name=f"gpu-check-{int(time.time())}", storage_path="/tmp/mpe-gpu-check"),
    )
    trainer.fit()
    ray.shutdown()
    m = json.loads(out.read_text())
    return {
        "global_batch": batch,
        "backend": "nccl" if gpu else "gloo",
        "samples_per_s": m["samples_per_s"],
        "mfu": m["flops_per_step"] / m["seconds_per_step"] / peak,
        "peak_memory_gib": m["peak_memory_gib"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--toy", action="store_true", help="toy sizes on the CPU (what make test runs)")
    ap.add_argument("--out", default=str(ROOT / "metrics" / "gpu_check.json"))
    ap.add_argument("--batch", type=int, default=None, help="global batch (default 1024; 16 with --toy)")
    args = ap.parse_args()
    gpu = torch.cuda.is_available() and not args.toy
    device = "cuda" if gpu else "cpu"
    t0 = time.perf_counter()
    peak = peak_bf16(device, 256 if args.toy else 8192)
    result = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "toy": args.toy,
        "bf16_peak_tflops": peak / 1e12,
        "cache": cache_check(args.toy, device, peak),
        "train": train_check(args.toy, gpu, peak, args.batch or (16 if args.toy else 1024)),
    }
    result["seconds"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
