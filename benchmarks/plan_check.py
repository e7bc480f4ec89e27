"""The planner against a measured `make run`: the plan of the project's params on a cluster description
(``plans/clusters/this-machine.yaml``: its peak from the ``peak.json`` measured beside the run) next to each
stage's measured time (``stage_seconds.json`` of ``benchmarks/clone_run.sh``), and whether each is within
±30 %.

Usage: python benchmarks/plan_check.py --project DIR --peak PEAK.json --stage-seconds FILE [--cluster FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--project", required=True)
    ap.add_argument("--peak", required=True)
    ap.add_argument("--stage-seconds", required=True)
    ap.add_argument("--cluster", default=str(ROOT / "plans" / "clusters" / "this-machine.yaml"))
    args = ap.parse_args()
    from mpe.config import load_params
    from mpe.planning.cluster import load_cluster
    from mpe.planning.plan import build_plans
    from mpe.runtime.peak import read_peak

    peak = read_peak(Path(args.peak).resolve())
    measured = json.loads(Path(args.stage_seconds).read_text())
    cluster = load_cluster(Path(args.cluster).resolve())
    os.chdir(args.project)
    (plan,) = build_plans(load_params("params.yaml"), [cluster], measured_peak=peak.flops)
    print(
        f"peak: fp32 {peak.flops['float32'] / 1e9:.0f}, bf16 {peak.flops['bfloat16'] / 1e9:.0f} GFLOP/s; "
        f"the plan runs in {plan.precision}\n"
    )
    print("| stage | predicted s | measured s | measured / predicted | within ±30 % |\n|---|---|---|---|---|")
    for s in plan.stages:
        if s.stage in measured:
            ratio = measured[s.stage] / s.seconds
            ok = "yes" if 0.7 <= ratio <= 1.3 else "no"
            print(f"| {s.stage} | {s.seconds:.0f} | {measured[s.stage]:.0f} | {ratio:.2f} | {ok} |")


if __name__ == "__main__":
    main()
