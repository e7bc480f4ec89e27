"""This machine's attainable peak (``mpe.runtime.peak``): matmul FLOP/s in fp32 and bf16 with the threads
torch uses, and memory bandwidth. Writes ``metrics/peak.json``, which the other benchmarks divide their
achieved FLOP/s by; run it in the same session (under the same lock) as the run it is compared with.

Usage: python benchmarks/peak.py [--hidden 576] [--mlp 1536] [--tokens 4096] [--seconds 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpe.records import PEAK  # noqa: E402
from mpe.runtime.peak import Peak, measure_peak, read_peak, write_peak  # noqa: E402

DEFAULT = ROOT / "metrics" / PEAK


def load_peak(path: Path = DEFAULT) -> Peak:
    """The peak a benchmark run wrote, or measured now (briefly) when none was."""
    return read_peak(path) or measure_peak(seconds=0.5)


def table(peak: Peak) -> str:
    return (
        f"| precision | attainable matmul GFLOP/s ({peak.threads} threads) |\n|---|---|\n"
        f"| fp32 | {peak.flops['float32'] / 1e9:.0f} |\n| bf16 | {peak.flops['bfloat16'] / 1e9:.0f} |\n"
        f"memory bandwidth (copy): {peak.mem_bytes_per_s / 1e9:.1f} GB/s"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--mlp", type=int, default=1536)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--out", default=str(DEFAULT))
    args = ap.parse_args()
    peak = measure_peak(args.hidden, args.mlp, args.tokens, args.seconds)
    write_peak(peak, args.out)
    print(table(peak))


if __name__ == "__main__":
    main()
