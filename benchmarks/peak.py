"""This machine's attainable peak: matmul FLOP/s in fp32 and bf16 (torch, all cores, shapes like the
trunk's: tokens × hidden by hidden × MLP width) and memory bandwidth (a large copy). Writes
``metrics/peak.json``, which the other benchmarks divide their achieved FLOP/s by.

Usage: python benchmarks/peak.py [--hidden 576] [--mlp 1536] [--tokens 4096] [--seconds 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, seconds: float) -> float:
    """Best time of one call, repeating for about ``seconds``."""
    fn()
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_flops(dtype: torch.dtype, shapes: list[tuple[int, int, int]], seconds: float) -> float:
    """Best FLOP/s over ``(m, k, n)`` shapes."""
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        t = timed(lambda a=a, b=b: a @ b, seconds / len(shapes))
        best = max(best, 2 * m * k * n / t)
    return best


def bandwidth(mb: int, seconds: float) -> float:
    """Bytes/s of a large copy (read + write)."""
    src = torch.empty(mb * (1 << 20) // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), seconds)
    return 2 * src.numel() * 4 / t


def measure(hidden: int = 576, mlp: int = 1536, tokens: int = 4096, seconds: float = 2.0) -> dict:
    shapes = [(tokens, hidden, mlp), (tokens, mlp, hidden), (tokens, hidden, hidden)]
    return {
        "threads": torch.get_num_threads(),
        "shapes": shapes,
        "fp32_flops": matmul_flops(torch.float32, shapes, seconds),
        "bf16_flops": matmul_flops(torch.bfloat16, shapes, seconds),
        "mem_bytes_per_s": bandwidth(256, seconds),
    }


def load_peak(path: Path = ROOT / "metrics" / "peak.json") -> dict:
    """The measured peak (measured now, briefly, if no benchmark has written it yet)."""
    if path.exists():
        return json.loads(path.read_text())
    return measure(seconds=0.5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--mlp", type=int, default=1536)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--out", default=str(ROOT / "metrics" / "peak.json"))
    args = ap.parse_args()
    peak = measure(args.hidden, args.mlp, args.tokens, args.seconds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(peak, indent=1))
    print(f"| precision | attainable matmul GFLOP/s ({peak['threads']} threads) |\n|---|---|")
    print(f"| fp32 | {peak['fp32_flops'] / 1e9:.0f} |\n| bf16 | {peak['bf16_flops'] / 1e9:.0f} |")
    print(f"memory bandwidth (copy): {peak['mem_bytes_per_s'] / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
