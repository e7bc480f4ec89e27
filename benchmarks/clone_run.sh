#!/usr/bin/env bash
# `make run` from a fresh clone, with this machine's peak measured just before and just after it, then every
# compute stage against that peak (benchmarks/stages.py) and each stage's time from the flow's log. Run it
# under the machine's heavy-job lock so nothing else heavy shares the cores:
#   flock /work/heavy.lock bash benchmarks/clone_run.sh [REPO] [OUT_DIR]
# pip's download cache should be warm (an earlier `make install`), as a returning user's is. The measuring
# scripts are this script's own (so a clone of an older commit is measured the same way).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=${1:-$(cd "$HERE/.." && pwd)}
OUT=${2:-/tmp/mpe-clone-run-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
CLONE="$OUT/clone"
git clone -q "$REPO" "$CLONE"
cd "$CLONE"
stamp() { python3 -u -c 'import sys,time
for line in sys.stdin: sys.stdout.write(time.strftime("%H:%M:%S ") + line); sys.stdout.flush()'; }
PY=$(command -v python3)
# the peak needs torch: measure it with the venv the run makes, before (install first) and after the run
start=$(date +%s)
( make install ) 2>&1 | stamp > "$OUT/install.log"
installed=$(date +%s)
.venv/bin/python "$HERE/peak.py" --out "$OUT/peak_before.json" | tee "$OUT/peak_before.md"
before_run=$(date +%s)
( make run ) 2>&1 | stamp > "$OUT/run.log"
end=$(date +%s)
.venv/bin/python "$HERE/peak.py" --out "$OUT/peak_after.json" | tee "$OUT/peak_after.md"
.venv/bin/python "$HERE/stages.py" --project "$CLONE" --peak "$OUT/peak_before.json" --out "$OUT/stages.json" \
  | tee "$OUT/stages.md"
"$PY" - "$OUT" <<'PY'
import json, re, sys
out = sys.argv[1]
lines = open(f"{out}/run.log").read().splitlines()
marks = []  # (time, stage) when dvc starts a stage, then when the flow's last task ends
for line in lines:
    m = re.search(r"^(\d\d:\d\d:\d\d) .*Running stage '(\w+)'", line)
    if m:
        marks.append((m.group(1), m.group(2)))
    m = re.search(r"^(\d\d:\d\d:\d\d) .*Task run 'dvc-push", line)
    if m and not any(s == "push" for _, s in marks):
        marks.append((m.group(1), "push"))
secs = lambda t: int(t[:2]) * 3600 + int(t[3:5]) * 60 + int(t[6:8])  # noqa: E731
stages = {s: secs(marks[i + 1][0]) - secs(t) for i, (t, s) in enumerate(marks[:-1])}
print(json.dumps(stages))
json.dump(stages, open(f"{out}/stage_seconds.json", "w"))
PY
echo "install: $((installed - start)) s; peak: $((before_run - installed)) s; mpe run: $((end - before_run)) s; " \
  "make run (install + run): $((installed - start + end - before_run)) s" | tee "$OUT/summary.txt"
tail -30 "$OUT/run.log" > "$OUT/run_tail.log"
