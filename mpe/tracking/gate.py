"""The promotion gate: which number is compared, and when a new model beats the champion."""

from __future__ import annotations

from mpe.errors import ConfigError


def is_benchmark_metric(metric: str) -> bool:
    """``<benchmark>.<metric>`` (``flickr30k.text_to_image_R@5``): a standard benchmark's, not the test split's."""
    return "." in metric


def gate_score(metrics: dict, metric: str) -> float:
    """The number the gate compares: one flat metric, or ``mean_recall`` over the test split's R@k (the
    compositional subset and the benchmarks left out): text↔image, or text↔video where the test split is
    clips (a video source); an image run's zero-shot video numbers do not enter it."""
    if metric == "mean_recall":
        recalls = {
            k: v
            for k, v in metrics.items()
            if "_R@" in k and not k.startswith("compositional_") and not is_benchmark_metric(k)
        }
        image = [v for k, v in recalls.items() if k.startswith(("text_to_image_", "image_to_text_"))]
        vals = image or list(recalls.values())
        if not vals:
            raise KeyError("no R@k metrics to average")
        return sum(vals) / len(vals)
    if metric not in metrics:
        raise ConfigError(
            f"register.gate_metric: '{metric}' is not among the evaluated metrics; available: "
            f"mean_recall, {', '.join(sorted(metrics))}"
        )
    return metrics[metric]


def decide(new: float, champion: float | None, margin: float) -> tuple[bool, str]:
    """Promote when there is no champion, or when ``new >= champion + margin``."""
    if champion is None:
        return True, f"no champion yet: promoted with score {new:.4f}"
    if new >= champion + margin:
        return True, f"score {new:.4f} beats the champion's {champion:.4f} by at least {margin}"
    return False, (
        f"score {new:.4f} does not beat the champion's {champion:.4f} by the margin {margin}: kept as challenger"
    )
