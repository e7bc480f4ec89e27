"""``mpe compare``: the last N MLflow runs side by side — the params that differ, recall and negation."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from mpe.atomic import write_text
from mpe.tracking_settings import TrackingSettings

HEADLINE = ["eval.text_to_image_R_at_1", "eval.text_to_image_R_at_5", "eval.text_to_image_R_at_10",
            "eval.image_to_text_R_at_1", "eval.image_to_text_R_at_5", "eval.image_to_text_R_at_10",
            "eval.negation_accuracy"]
SHORT = {k: k.removeprefix("eval.").replace("_R_at_", " R@").replace("text_to_image", "t→i")
         .replace("image_to_text", "i→t").replace("negation_accuracy", "negation") for k in HEADLINE}


def compare_runs(settings: TrackingSettings, last: int = 5) -> str:
    """A markdown table of the last ``last`` runs of the experiment (newest first)."""
    import mlflow

    mlflow.set_tracking_uri(settings.tracking_uri)
    exp = mlflow.get_experiment_by_name(settings.experiment)
    if exp is None:
        return f"no MLflow experiment '{settings.experiment}' yet: run the pipeline first\n"
    runs = mlflow.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=last,
                              output_format="list")
    if not runs:
        return "no runs yet\n"
    keys = sorted({k for r in runs for k in r.data.params})
    differing = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    cols = ["run", "started"] + differing + [SHORT[k] for k in HEADLINE]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in runs:
        started = dt.datetime.fromtimestamp(r.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
        row = [r.info.run_name or r.info.run_id[:8], started]
        row += [str(r.data.params.get(k, "")) for k in differing]
        row += [f"{r.data.metrics[k]:.3f}" if k in r.data.metrics else "–" for k in HEADLINE]
        lines.append("| " + " | ".join(row) + " |")
    if not differing:
        lines.append("")
        lines.append("(these runs share every param)")
    return "\n".join(lines) + "\n"


def write_comparison(settings: TrackingSettings, out: Path, last: int = 5) -> str:
    table = compare_runs(settings, last)
    write_text(out, table)
    return table
