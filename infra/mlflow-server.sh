#!/usr/bin/env bash
# An MLflow tracking server on Postgres with artifacts in S3. Set the three variables first.
set -euo pipefail
: "${MLFLOW_DB_URI:?postgresql://user:pass@host:5432/mlflow}"
: "${MLFLOW_ARTIFACTS:?s3://bucket/mlflow-artifacts}"
: "${MLFLOW_PORT:=5000}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true
exec mlflow server --backend-store-uri "$MLFLOW_DB_URI" --artifacts-destination "$MLFLOW_ARTIFACTS" \
  --host 0.0.0.0 --port "$MLFLOW_PORT"
