#!/usr/bin/env bash
# A process work pool on this host, the nightly deployment from prefect.yaml, and a worker.
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false
prefect work-pool create local-process --type process || true
prefect --no-prompt deploy --all
exec prefect worker start --pool local-process
