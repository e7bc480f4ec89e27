"""Peak memory of ``mpe serve`` under requests of large images: starts the server on a model folder on
127.0.0.1, sends requests of ``--rows`` base64 PNGs (``--side``×``--side`` grayscale, a flat canvas:
~16 kB each at 4096², inside every body and row limit), ``--concurrency`` at a time, and reads the
server's peak resident memory (``VmHWM`` in ``/proc/<pid>/status``, reset before each case by writing
5 to ``/proc/<pid>/clear_refs``). Reports, per case, the answers' status codes and the peak RSS, beside
the peak after loading and one small request.

Usage: python benchmarks/serve_memory.py --model MODEL_FOLDER [--rows 1 8 24] [--side 4096]
       [--concurrency 1] [--serve-args "--max-request-megapixels 1000"] [--out metrics/serve_memory.json]
Linux only (procfs); ``clear_refs`` needs the same user as the server.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(side: int, shade: int) -> str:
    buf = io.BytesIO()
    Image.new("L", (side, side), shade).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _body(rows: list[list]) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["text", "image"], "data": rows}}).encode()


def _post(client: httpx.Client, body: bytes) -> tuple[int, str]:
    r = client.post("/invocations", content=body, headers={"content-type": "application/json"})
    return r.status_code, r.text[:160] if r.status_code != 200 else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a model folder (mpe model init --out ...)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 24])
    ap.add_argument("--side", type=int, default=4096)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--serve-args", default="", help="extra `mpe serve` options")
    ap.add_argument("--out", default="metrics/serve_memory.json")
    args = ap.parse_args()
    port = _free_port()
    mpe = Path(sys.executable).with_name("mpe")
    cmd = [str(mpe), "serve", "--model", args.model, "--port", str(port), *shlex.split(args.serve_args)]
    log = open(Path(args.out).with_suffix(".log"), "w") if Path(args.out).parent.is_dir() else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"mpe serve exited with {proc.returncode}")
            try:
                if httpx.get(f"{url}/ping", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("mpe serve did not answer /ping in 300 s")
            time.sleep(0.5)
        with httpx.Client(base_url=url, timeout=600) as client:
            small = _body([["a red circle", None], [None, _png(64, 90)]])
            assert client.post("/invocations", content=small, headers={"content-type": "application/json"}).is_success
            loaded = _peak_mb(proc.pid)
            cases = []
            for n in args.rows:
                body = _body([[None, _png(args.side, (17 * i) % 256)] for i in range(n)])
                _reset_peak(proc.pid)
                t = time.perf_counter()

                with ThreadPoolExecutor(args.concurrency) as pool:
                    answers = list(pool.map(lambda b: _post(client, b), [body] * args.concurrency))
                cases.append(
                    {
                        "rows": n,
                        "side": args.side,
                        "body_kb": round(len(body) / 1024),
                        "concurrency": args.concurrency,
                        "status": sorted({s for s, _ in answers}),
                        "message": next((m for _, m in answers if m), ""),
                        "wall_s": round(time.perf_counter() - t, 2),
                        "peak_rss_mb": round(_peak_mb(proc.pid)),
                    }
                )
                print(json.dumps(cases[-1]), flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    print(f"after loading and one small request: peak RSS {loaded:.0f} MB")
    print(f"| rows of {args.side}² PNG | body kB | concurrency | status | wall s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for c in cases:
        cells = [c["rows"], c["body_kb"], c["concurrency"], c["status"], c["wall_s"], c["peak_rss_mb"]]
        print("| " + " | ".join(map(str, cells)) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cmd": cmd[1:], "loaded_peak_rss_mb": round(loaded), "load_avg_1m": os.getloadavg()[0]}
    out.write_text(json.dumps({"meta": meta, "cases": cases}, indent=1))


if __name__ == "__main__":
    main()
