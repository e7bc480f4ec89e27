"""Torch dtypes by the names params.yaml uses, and the compute precision chosen by measuring: bf16
autocast on CUDA; on a CPU only where a short probe (a few trunk-shaped matmuls, well under a second)
shows bf16 faster than fp32 — CPUs with bf16 units (AVX-512 BF16, AMX) run it several times faster,
others several times slower."""

from __future__ import annotations

import functools
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} (one of {', '.join(DTYPES)})") from None


@functools.cache
def cpu_bf16_speedup(m: int = 1024, k: int = 576, n: int = 1536, reps: int = 5, hopeless: float = 5.0) -> float:
    """How many times faster a bf16 matmul runs than fp32 on this CPU (best of ``reps`` after a warm-up).

    A CPU without bf16 units emulates it ~100× slower than fp32: once a bf16 call is ``hopeless``× slower
    than fp32's best (4× that for the warm-up call), more calls could not bring it near the threshold, and
    the probe stops there (on such a CPU the full probe takes seconds, in every stage that asks)."""
    a32, b32 = torch.randn(m, k), torch.randn(k, n)
    fp32 = _best(lambda: a32 @ b32, reps)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    t = time.perf_counter()
    a16 @ b16  # warm-up: kernel set-up costs milliseconds, an emulated bf16 ~100× fp32's time
    first = time.perf_counter() - t
    if first > 4 * hopeless * fp32:
        return fp32 / first
    bf16 = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a16 @ b16
        bf16 = min(bf16, time.perf_counter() - t)
        if bf16 > hopeless * fp32:
            break
    return fp32 / bf16


def _best(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def autocast_dtype(mode: str, device: str, min_speedup: float = 1.3) -> torch.dtype | None:
    """``auto``: bf16 on CUDA, and on a CPU whose probe shows bf16 at least ``min_speedup``× faster;
    ``bfloat16``: always; ``none``: fp32. None means no autocast (fp32 compute)."""
    if mode == "none":
        return None
    if mode == "bfloat16" or device == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_bf16_speedup() >= min_speedup else None


def dtype_name(autocast: torch.dtype | None) -> str:
    return "bfloat16" if autocast == torch.bfloat16 else "float32"


def autocast_of(name: str) -> torch.dtype | None:
    """The autocast dtype of a decision recorded by :func:`dtype_name` (None: fp32, no autocast)."""
    return torch.bfloat16 if name == "bfloat16" else None
