"""How to lay the train stage out on this machine: Ray Train workers × torch threads per worker × decode
processes per worker, at the same global batch (the default's 128). Each layout runs the real train stage
(`mpe train` with overrides) for a few steps in a project after `make run`, into scratch folders, and is
timed by its own metrics: the median step time after the first steps, and the stage's time outside the
steps. Run it under the machine's heavy-job lock, with the peak measured beside it:

    flock /work/heavy.lock .venv/bin/python benchmarks/train_layout.py --project DIR [--steps 24]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (workers, threads per worker, decode processes per worker)
LAYOUTS = [(2, 1, 1), (1, 2, 1), (2, 1, 0), (1, 2, 0), (1, 2, 2)]


def run_layout(project: Path, workers: int, threads: int, loaders: int, steps: int, global_batch: int) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix=f"layout-w{workers}t{threads}l{loaders}-"))
    sets = {
        "train.num_workers": workers,
        "train.threads_per_worker": threads,
        "train.loader_workers": loaders,
        "train.batch_size": global_batch // workers,
        "train.max_steps": steps,
        "train.checkpoint_every": steps,
        "train.run_name": f"layout-w{workers}t{threads}l{loaders}",
        "train.storage_path": str(scratch / "ray_results"),
        "train.out_dir": str(scratch / "trained"),
        "metrics_dir": str(scratch / "metrics"),
        "mlflow.tracking_uri": f"sqlite:///{scratch / 'mlruns.db'}",
        "mlflow.artifact_root": str(scratch / "mlartifacts"),
        "ray.num_cpus": 2,
    }
    args = [str(Path(sys.executable).parent / "mpe"), "train"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    out = subprocess.run(args, cwd=project, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{args}: {out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    history = json.loads((scratch / "metrics" / "train_history.json").read_text())
    summary = json.loads((scratch / "metrics" / "train.json").read_text())
    tail = [r["step_s"] for r in history[3:]]
    return {
        "workers": workers,
        "threads_per_worker": threads,
        "loader_workers": loaders,
        "batch_per_worker": global_batch // workers,
        "median_step_s": statistics.median(tail),
        "first_step_s": history[0]["step_s"],
        "data_wait_share": summary["data_wait_share_after_first_step"],
        "outside_steps_s": summary["seconds"]["outside_steps"],
        "compute_dtype": summary.get("compute_dtype"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--project", required=True)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--global-batch", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "metrics" / "train_layout.json"))
    args = ap.parse_args()
    rows = [run_layout(Path(args.project).resolve(), *lay, args.steps, args.global_batch) for lay in LAYOUTS]
    print(
        "| workers × threads | decode processes per worker | batch per worker | s / step (median) | "
        "data wait | outside the steps (s) |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['workers']} × {r['threads_per_worker']} | {r['loader_workers']} | {r['batch_per_worker']} | "
            f"{r['median_step_s']:.3f} | {r['data_wait_share']:.1%} | {r['outside_steps_s']:.1f} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
