"""How the data path's cost grows with the corpus: a synthetic corpus of N samples, cached and streamed.

For each N (default 10k, 50k, 200k): write N samples as webdataset shards (64 px PNG, unique captions),
run the cache stage's shard loop with a tiny random-init Llama trunk (so the data path, not the LLM, is
measured), then stream batches through the training loader (one decode process) at 64 px PNG and at
224 px JPEG (the same keys and captions, so the same cache shards). Each measurement runs in a fresh
child process, whose peak RSS is read back (``ru_maxrss``; the loader's decode process counted as a
child of the training process).

Writes ``metrics/data_scale.json`` (lists, one entry per N) and prints the table.

Usage: python benchmarks/data_scale.py [--n 10000 50000 200000] [--work DIR] [--batches 120]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PER_SHARD = 1000


def child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


TINY_BASE = r"""
import json, sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from mpe.model.base_model import resolve_base_model
from mpe.model.text.apt_tokens import add_apt_tokens
tok = AutoTokenizer.from_pretrained(resolve_base_model("smollm2-135m"))
torch.manual_seed(0)
lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))
add_apt_tokens(lm, tok, 4)
lm.save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])
print(json.dumps({}))
"""

CACHE = r"""
import json, resource, sys, time, torch
from pathlib import Path
from mpe.cache.compute import cache_data_shard, load_trunk_tower
from mpe.config import TextConfig
torch.set_num_threads(2)
base, shards, out = Path(sys.argv[1]), sorted(Path(sys.argv[2]).glob("*.tar")), Path(sys.argv[3])
tower = load_trunk_tower(base, TextConfig(num_prompts=4))
t0, n = time.perf_counter(), 0
for s in shards:
    n += cache_data_shard(tower, str(s), str(out / (s.stem + ".safetensors")), "float16", batch_size=128)["samples"]
dt = time.perf_counter() - t0
size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
print(json.dumps({"samples": n, "seconds": dt, "bytes": size,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

INGEST = r"""
import json, resource, sys, time, torch
from pathlib import Path
from mpe.data.train_stream import StreamSpec, TrainLoader
torch.set_num_threads(1)
data, cache = sorted(Path(sys.argv[1]).glob("*.tar")), Path(sys.argv[2])
size, batches = int(sys.argv[3]), int(sys.argv[4])
spec = StreamSpec(tuple(map(str, data)), tuple(str(cache / (d.stem + ".safetensors")) for d in data),
                  batch_size=64, image_size=size, shuffle_buffer=512, seed=0, workers=1)
loader = TrainLoader(spec, prefetch=4)
for _ in range(5):  # warm-up: the decode process starts and fills the buffer
    next(loader)
t0 = time.perf_counter()
for _ in range(batches):
    b = next(loader)
dt = time.perf_counter() - t0
loader.close()
del loader
import gc; gc.collect(); time.sleep(0.5)
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"samples_per_s": batches * 64 / dt, "peak_rss_mb": own + kids, "trainer_mb": own,
                  "decoder_mb": kids}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    ap.add_argument("--work", default=None)
    ap.add_argument("--batches", type=int, default=120)
    ap.add_argument("--out", default=str(ROOT / "metrics" / "data_scale.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from mpe.files.atomic import write_json
    from tests.synthetic_corpus import write_corpus

    work = Path(args.work or tempfile.mkdtemp(prefix="mpe-data-scale-"))
    base = work / "tiny-base"
    if not (base / "config.json").exists():
        child(TINY_BASE, str(base))
    keys = [
        "n",
        "cache_samples_per_s",
        "bytes_per_sample",
        "ingest_samples_per_s_per_core_64px",
        "ingest_samples_per_s_per_core_224px",
        "peak_rss_cache_mb",
        "peak_rss_train_mb",
    ]
    result = {k: [] for k in keys}
    for n in args.n:
        d = work / f"n{n}"
        shutil.rmtree(d, ignore_errors=True)
        t = time.perf_counter()
        write_corpus(d / "png64", n, PER_SHARD, image_size=64, fmt="png")
        write_corpus(d / "jpg224", n, PER_SHARD, image_size=224, fmt="jpg")
        print(f"N={n}: corpus written in {time.perf_counter() - t:.0f} s", flush=True)
        (d / "cache").mkdir()
        c = child(CACHE, str(base), str(d / "png64"), str(d / "cache"))
        i64 = child(INGEST, str(d / "png64"), str(d / "cache"), "64", str(args.batches))
        i224 = child(INGEST, str(d / "jpg224"), str(d / "cache"), "224", str(args.batches))
        row = {
            "n": n,
            "cache_samples_per_s": c["samples"] / c["seconds"],
            "bytes_per_sample": c["bytes"] / n,
            "ingest_samples_per_s_per_core_64px": i64["samples_per_s"],
            "ingest_samples_per_s_per_core_224px": i224["samples_per_s"],
            "peak_rss_cache_mb": c["peak_rss_mb"],
            "peak_rss_train_mb": i64["peak_rss_mb"],
        }
        print(json.dumps(row), flush=True)
        for k in keys:
            result[k].append(row[k])
        shutil.rmtree(d, ignore_errors=True)
    write_json(args.out, result)
    print(
        "\n| N | cache samples/s | bytes/sample | ingest/s/core 64 px PNG | ingest/s/core 224 px JPEG | "
        "peak RSS cache (MB) | peak RSS train worker (MB) |\n|---|---|---|---|---|---|---|"
    )
    for j, n in enumerate(result["n"]):
        print(
            f"| {n:,} | {result['cache_samples_per_s'][j]:,.0f} | {result['bytes_per_sample'][j]:,.0f} | "
            f"{result['ingest_samples_per_s_per_core_64px'][j]:,.0f} | "
            f"{result['ingest_samples_per_s_per_core_224px'][j]:,.0f} | {result['peak_rss_cache_mb'][j]:,.0f} | "
            f"{result['peak_rss_train_mb'][j]:,.0f} |"
        )
    if len(result["n"]) > 1:
        for k in ("peak_rss_cache_mb", "peak_rss_train_mb"):
            print(
                f"{k}: {100 * (result[k][-1] / result[k][0] - 1):+.1f} % from N={result['n'][0]:,} "
                f"to N={result['n'][-1]:,}"
            )


if __name__ == "__main__":
    main()
