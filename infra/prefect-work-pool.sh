#!/usr/bin/env bash
# A process work pool on this host, the nightly deployment from prefect.yaml, and a worker.
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false
mpe work-pool --name local-process
prefect --no-prompt deploy --all
exec prefect worker start --pool local-process
