"""The short report `make run` ends with: metrics, the registered version and alias, where to look."""

from __future__ import annotations

import json
from pathlib import Path


def run_summary(params) -> str:
    m = Path(params.evaluate.out_dir)
    lines = ["", "== mpe run summary =="]
    ev = json.loads((m / "eval.json").read_text()) if (m / "eval.json").exists() else None
    if ev:
        t, u, c = ev["trained"], ev.get("untrained", {}), ev["chance"]
        lines.append(f"{'metric (test split)':32s} {'trained':>8s} {'untrained':>10s} {'chance':>8s}")
        for k in ("text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10", "image_to_text_R@1",
                  "image_to_text_R@5", "image_to_text_R@10", "negation_accuracy", "zero_shot_shape_accuracy",
                  "zero_shot_colour_accuracy"):
            if k in t:
                lines.append(f"{k:32s} {t[k]:8.3f} {u.get(k, float('nan')):10.3f} {c.get(k, float('nan')):8.3f}")
    reg = json.loads((m / "register.json").read_text()) if (m / "register.json").exists() else None
    if reg:
        lines.append(f"registered: models:/{reg['model_name']} version {reg['version']} -> @{reg['alias']} "
                     f"({reg['reason']})")
    lines += [
        f"outputs: {params.data.out_dir}/ {params.base_model.out_dir}/ {params.cache.root}/ {params.train.out_dir}/ "
        f"{params.evaluate.out_dir}/ {params.evaluate.plots_dir}/ (DVC-tracked; `dvc push` done to "
        f"'{params.dvc.remote}')",
        f"MLflow: {params.mlflow.tracking_uri} (experiment '{params.mlflow.experiment}'); "
        "Prefect: flow runs in .prefect/",
        "UIs: `make ui` -> MLflow http://127.0.0.1:5000 and Prefect http://127.0.0.1:4200",
        "compare runs: `mpe compare`",
    ]
    return "\n".join(lines)
