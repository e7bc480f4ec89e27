"""A bounded load run against a running embedding server (``mpe serve`` or ``mlflow models serve``):
N requests, C at a time, for each mix of rows (text only, image only, half and half), reporting the
latency percentiles and the throughput. Each request is one MLflow ``dataframe_split`` of ``--rows`` rows;
captions are distinct and images are 224×224 JPEGs of random colour blocks, so no cache can help.

Usage: python benchmarks/serve_latency.py --url http://127.0.0.1:8000 [--requests 200] [--concurrency 4]
       [--rows 1] [--mixes text image mixed] [--out metrics/serve_latency.json]
A 4xx/5xx answer counts as an error (reported), not as a latency.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

WORDS = "red blue green small large circle square triangle striped dotted left right above below two three".split()


def _caption(rng: random.Random, i: int) -> str:
    return f"{' '.join(rng.choices(WORDS, k=8))} number {i}"


def _image(rng: random.Random) -> str:
    im = Image.new("RGB", (224, 224), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(6):
        x, y = rng.randrange(200), rng.randrange(200)
        im.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 24, y + 24))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return base64.b64encode(buf.getvalue()).decode()


def payloads(mix: str, n: int, rows: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        data = []
        for j in range(rows):
            text = mix == "text" or (mix == "mixed" and (i * rows + j) % 2 == 0)
            data.append([_caption(rng, i * rows + j), None] if text else [None, _image(rng)])
        out.append(json.dumps({"dataframe_split": {"columns": ["text", "image"], "data": data}}).encode())
    return out


def run(url: str, bodies: list[bytes], concurrency: int) -> dict:
    with httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:

        def one(body: bytes):
            t = time.perf_counter()
            r = client.post("/invocations", content=body, headers={"content-type": "application/json"})
            return time.perf_counter() - t, r.status_code

        client.post("/invocations", content=bodies[0], headers={"content-type": "application/json"})  # warm-up
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, bodies))
        wall = time.perf_counter() - start
    ok = np.array([t for t, s in results if s == 200])
    return {
        "requests": len(bodies),
        "errors": sum(s != 200 for _, s in results),
        "wall_s": round(wall, 2),
        "p50_ms": round(float(np.percentile(ok, 50)) * 1000, 1) if ok.size else None,
        "p95_ms": round(float(np.percentile(ok, 95)) * 1000, 1) if ok.size else None,
        "req_per_s": round(len(bodies) / wall, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rows", type=int, default=1, help="rows per request")
    ap.add_argument("--mixes", nargs="+", default=["text", "image", "mixed"], choices=["text", "image", "mixed"])
    ap.add_argument("--out", default="metrics/serve_latency.json")
    args = ap.parse_args()
    httpx.get(f"{args.url}/ping", timeout=10).raise_for_status()
    rows = []
    for mix in args.mixes:
        r = run(args.url, payloads(mix, args.requests, args.rows), args.concurrency)
        rows.append(
            {
                "mix": mix,
                "rows_per_request": args.rows,
                "concurrency": args.concurrency,
                **r,
                "rows_per_s": round(r["req_per_s"] * args.rows, 2),
            }
        )
    print("| mix | rows/request | requests | concurrency | errors | p50 ms | p95 ms | requests/s | rows/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mix']} | {r['rows_per_request']} | {r['requests']} | {r['concurrency']} | {r['errors']} | "
            f"{r['p50_ms']} | {r['p95_ms']} | {r['req_per_s']} | {r['rows_per_s']} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "url": args.url,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}; 1-min load average {meta['load_avg_1m']:.1f} on {meta['cpus']} CPUs")


if __name__ == "__main__":
    main()
