"""``mpe compare``: the last N MLflow runs side by side — the params that differ, recall and negation."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from mpe.files.atomic import write_text
from mpe.records import short_name, to_mlflow
from mpe.tracking.runs import check_store
from mpe.tracking.settings import TrackingSettings

HEADLINE = [
    "text_to_image_R@1",
    "text_to_image_R@5",
    "text_to_image_R@10",
    "image_to_text_R@1",
    "image_to_text_R@5",
    "image_to_text_R@10",
    "negation_accuracy",
]
# the trained model's metrics as the evaluate stage logged them, and their column names
KEYS = {key: short_name(name) for name, key in zip(HEADLINE, to_mlflow({"trained": dict.fromkeys(HEADLINE, 0)}))}


def compare_runs(settings: TrackingSettings, last: int = 5) -> str:
    """A markdown table of the last ``last`` runs of the experiment (newest first)."""
    import mlflow

    check_store(settings.tracking_uri)
    mlflow.set_tracking_uri(settings.tracking_uri)
    exp = mlflow.get_experiment_by_name(settings.experiment)
    if exp is None:
        return f"no MLflow experiment '{settings.experiment}' yet: run the pipeline first\n"
    runs = mlflow.search_runs(
        [exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=last, output_format="list"
    )
    if not runs:
        return "no runs yet\n"
    keys = sorted({k for r in runs for k in r.data.params})
    differing = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    cols = ["run", "started"] + differing + list(KEYS.values())
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in runs:
        started = dt.datetime.fromtimestamp(r.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
        row = [r.info.run_name or r.info.run_id[:8], started]
        row += [str(r.data.params.get(k, "")) for k in differing]
        row += [f"{r.data.metrics[k]:.3f}" if k in r.data.metrics else "–" for k in KEYS]
        lines.append("| " + " | ".join(row) + " |")
    if not differing:
        lines.append("")
        lines.append("(these runs share every param)")
    return "\n".join(lines) + "\n"


def write_comparison(settings: TrackingSettings, out: Path, last: int = 5) -> str:
    table = compare_runs(settings, last)
    write_text(out, table)
    return table
