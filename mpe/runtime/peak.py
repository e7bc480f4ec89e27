"""This machine's attainable peak, measured: matmul FLOP/s in fp32 and bf16 (torch, the threads torch uses,
shapes like a trunk's: tokens × hidden by hidden × MLP width, best of repeated calls) and memory bandwidth
(a large copy). Every stage's speed is reported as a share of it, and the planner predicts from it.

Machines of one kind differ (a CPU with bf16 units runs bf16 several times faster than fp32, one without
emulates it ~100× slower), so nothing here is a constant: it is measured where it is used.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class Peak:
    """Attainable FLOP/s by precision name (``float32``, ``bfloat16``) and copy bandwidth in bytes/s."""

    flops: dict[str, float]
    mem_bytes_per_s: float
    threads: int
    shapes: list = field(default_factory=list)

    def best_precision(self) -> str:
        """The precision with the higher peak (what ``autocast: auto`` would pick on this machine)."""
        return max(self.flops, key=self.flops.get)

    def to_json(self) -> dict:
        # fp32_flops / bf16_flops: the names benchmarks/ and docs/BENCHMARKS.md have used since the start
        return {
            **asdict(self),
            "fp32_flops": self.flops["float32"],
            "bf16_flops": self.flops["bfloat16"],
        }

    @classmethod
    def from_json(cls, data: dict) -> Peak:
        flops = data.get("flops") or {"float32": data["fp32_flops"], "bfloat16": data["bf16_flops"]}
        return cls(flops, data["mem_bytes_per_s"], data["threads"], data.get("shapes", []))


def best_time(fn, seconds: float, min_calls: int = 1) -> float:
    """Best time of one call after a warm-up call, repeating for about ``seconds`` (at least ``min_calls``)."""
    fn()
    best, calls, end = float("inf"), 0, time.perf_counter() + seconds
    while calls < min_calls or time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        calls += 1
    return best


def matmul_flops(dtype: torch.dtype, shapes: list[tuple[int, int, int]], seconds: float) -> float:
    """Best FLOP/s of ``(m, k) @ (k, n)`` over ``shapes``."""
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        t = best_time(lambda a=a, b=b: a @ b, seconds / len(shapes))
        best = max(best, 2 * m * k * n / t)
    return best


def copy_bandwidth(mb: int, seconds: float) -> float:
    """Bytes/s of a large copy (read + write)."""
    src = torch.empty(mb * (1 << 20) // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t = best_time(lambda: dst.copy_(src), seconds)
    return 2 * src.numel() * 4 / t


def measure_peak(hidden: int = 576, mlp: int = 1536, tokens: int = 4096, seconds: float = 2.0) -> Peak:
    """The peak of this machine with the threads torch uses now; ``seconds`` per precision, roughly (a
    precision the CPU emulates takes longer: every shape is called twice whatever the budget)."""
    shapes = [(tokens, hidden, mlp), (tokens, mlp, hidden), (tokens, hidden, hidden)]
    flops = {
        "float32": matmul_flops(torch.float32, shapes, seconds),
        "bfloat16": matmul_flops(torch.bfloat16, shapes, seconds),
    }
    return Peak(flops, copy_bandwidth(256, seconds), torch.get_num_threads(), [list(s) for s in shapes])


def read_peak(path: str | Path) -> Peak | None:
    """A peak written by :func:`write_peak` (``benchmarks/peak.py``), or None when there is none."""
    path = Path(path)
    return Peak.from_json(json.loads(path.read_text())) if path.exists() else None


def write_peak(peak: Peak, path: str | Path) -> None:
    from mpe.files.atomic import write_json

    write_json(Path(path), peak.to_json())
