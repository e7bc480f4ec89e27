"""The short report ``mpe run`` ends with: the test split's metrics against the untrained twin and chance,
the registered version and alias, and where to look."""

from __future__ import annotations

from mpe.records import EVAL, REGISTER, read_metrics

HEADLINE = (
    "text_to_image_R@1",
    "text_to_image_R@5",
    "text_to_image_R@10",
    "image_to_text_R@1",
    "image_to_text_R@5",
    "image_to_text_R@10",
    "negation_accuracy",
    "zero_shot_shape_accuracy",
    "zero_shot_colour_accuracy",
    # the video test split (zero-shot beside an image world: frames mean-pooled)
    "text_to_video_R@1",
    "text_to_video_R@5",
    "video_to_text_R@1",
    "video_to_text_R@5",
    "text_to_video_MdR",
    "motion_video_to_text_accuracy",
    "motion_text_to_video_accuracy",
)


def run_summary(metrics_dir: str, outputs: list[str], tracking_uri: str, experiment: str, dvc_remote: str) -> str:
    """``outputs``: the folders the run wrote (DVC-tracked)."""
    lines = ["", "== mpe run summary =="]
    ev = read_metrics(metrics_dir, EVAL)
    if ev:
        t, u, c = ev["trained"], ev.get("untrained", {}), ev["chance"]
        lines.append(f"{'metric (test split)':32s} {'trained':>8s} {'untrained':>10s} {'chance':>8s}")
        for k in HEADLINE:
            if k in t:
                lines.append(f"{k:32s} {t[k]:8.3f} {u.get(k, float('nan')):10.3f} {c.get(k, float('nan')):8.3f}")
    reg = read_metrics(metrics_dir, REGISTER)
    if reg:
        lines.append(
            f"registered: models:/{reg['model_name']} version {reg['version']} -> @{reg['alias']} ({reg['reason']})"
        )
    lines += [
        f"outputs: {' '.join(o.rstrip('/') + '/' for o in outputs)} (DVC-tracked; `dvc push` done to '{dvc_remote}')",
        f"MLflow: {tracking_uri} (experiment '{experiment}'); Prefect: flow runs in .prefect/",
        "UIs: `make ui` -> MLflow http://127.0.0.1:5000 and Prefect http://127.0.0.1:4200",
        "compare runs: `mpe compare`",
    ]
    return "\n".join(lines)
