"""What checking shards costs at a stage start: hashing throughput (sha256 for data shards and model
folders, CRC-32 for cache shards), a stage start that reads every data shard (no verification record: a
fresh copy, or every start without one) against one that only stats them (the record of the data stage),
and reading a cache shard in full with its checksums.

Synthetic files in a temporary folder: ``--shards`` data shards of ``--shard-mb`` MB of random bytes (hashing
does not care what the bytes are), and one cache shard of ``--cache-mb`` MB of float16 states. Writes
``metrics/shard_verification.json``.

Usage: python benchmarks/shard_verification.py [--shards 16] [--shard-mb 32] [--cache-mb 64]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rate(fn, nbytes: int, reps: int = 3) -> float:
    """GB/s of ``fn`` over ``nbytes`` (best of ``reps``)."""
    best = min(_timed(fn) for _ in range(reps))
    return nbytes / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--shard-mb", type=int, default=32)
    ap.add_argument("--cache-mb", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "metrics" / "shard_verification.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from mpe.cache.store import STORAGE, ShardReader, ShardWriter, text_digest
    from mpe.data.stats import STATS_FILE, shard_manifest, verified_shards
    from mpe.files.verified import RECORD

    block = os.urandom(64 << 20)
    out = {
        "sha256_GB_per_s": round(_rate(lambda: hashlib.sha256(block).digest(), len(block)), 3),
        "crc32_GB_per_s": round(_rate(lambda: zlib.crc32(block), len(block)), 3),
    }
    with tempfile.TemporaryDirectory(prefix="mpe-verify-") as tmp:
        root = Path(tmp)
        folder = root / "shards" / "train"
        folder.mkdir(parents=True)
        for i in range(args.shards):
            (folder / f"{i:05d}.tar").write_bytes(os.urandom(args.shard_mb << 20))
        manifest = shard_manifest(folder)  # what the data stage does; it writes the record as it hashes
        (root / STATS_FILE).write_text(json.dumps({"splits": {"train": {"shards": manifest}}}))
        with_record = min(_timed(lambda: verified_shards(root, "train")) for _ in range(3))
        without = []
        for _ in range(2):
            (folder / RECORD).unlink(missing_ok=True)  # every start of a stage without the record
            without.append(_timed(lambda: verified_shards(root, "train")))
        data_bytes = args.shards * (args.shard_mb << 20)
        out["data_shards"] = {
            "shards": args.shards,
            "bytes": data_bytes,
            "start_reading_every_shard_s": round(min(without), 3),
            "start_with_the_record_s": round(with_record, 4),
            "per_shard_with_the_record_ms": round(1000 * with_record / args.shards, 3),
        }

        hidden, rows = 576, 90  # the default's trunk width, rows of a caption with K=4 + 4 negated prompts
        n = max(1, (args.cache_mb << 20) // (rows * hidden * 2))
        path = root / "cache.safetensors"
        texts = [f"caption {u}" for u in range(n)]
        w = ShardWriter(
            path,
            STORAGE["float16"],
            hidden,
            [rows - 40] * n,
            40,
            [text_digest(t) for t in texts],
            list(range(n)),
            {"keys": json.dumps(texts)},
        )
        states = torch.randn(rows, hidden)
        for u in range(n):
            w.write_caption(u, states)
        w.close()
        size = path.stat().st_size

        def verify():
            with ShardReader(str(path)) as r:
                r.verify()

        out["cache_shard"] = {
            "captions": n,
            "bytes": size,
            "verify_GB_per_s": round(_rate(verify, size), 3),
            "per_caption_read_and_check_ms": round(1000 * _timed(verify) / n, 4),
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
