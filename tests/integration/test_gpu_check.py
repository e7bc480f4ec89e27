"""The GPU check script, run at toy size on the CPU: the same code path (trunk in bf16, a Ray Train step,
masked vs separate passes) that a lent H100/H200 runs at Gemma-2B size."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_at_toy_size(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--toy", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["toy"] and r["device"] == "cpu" and r["bf16_peak_tflops"] > 0
    assert r["cache"]["captions_per_s"] > 0 and r["cache"]["mfu"] > 0
    assert r["cache"]["masked_over_separate"] > 0  # its speed is a benchmark's figure, not a test's
    assert r["train"]["backend"] == "gloo" and r["train"]["samples_per_s"] > 0 and r["train"]["mfu"] > 0
