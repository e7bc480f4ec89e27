"""The promotion gate: which number is compared, and when a new model beats the champion."""

from __future__ import annotations


def gate_score(metrics: dict, metric: str) -> float:
    """The number the gate compares: one flat metric, or ``mean_recall`` over every R@k."""
    if metric == "mean_recall":
        vals = [v for k, v in metrics.items() if "_R@" in k and not k.startswith("compositional_")]
        if not vals:
            raise KeyError("no R@k metrics to average")
        return sum(vals) / len(vals)
    return metrics[metric]


def decide(new: float, champion: float | None, margin: float) -> tuple[bool, str]:
    """Promote when there is no champion, or when ``new >= champion + margin``."""
    if champion is None:
        return True, f"no champion yet: promoted with score {new:.4f}"
    if new >= champion + margin:
        return True, f"score {new:.4f} beats the champion's {champion:.4f} by at least {margin}"
    return False, (f"score {new:.4f} does not beat the champion's {champion:.4f} by the margin {margin}: "
                   "kept as challenger")
