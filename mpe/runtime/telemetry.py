"""Switch off every phone-home the pipeline's libraries do; called before they import."""

from __future__ import annotations

import os

OFF = {
    "NO_ALBUMENTATIONS_UPDATE": "1",  # img2dataset → albumentations version check
    "RAY_USAGE_STATS_ENABLED": "0",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "WANDB_MODE": "disabled",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}


def disable_telemetry() -> None:
    """Set the switches unless the user set them already."""
    for k, v in OFF.items():
        os.environ.setdefault(k, v)
