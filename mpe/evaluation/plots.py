"""PNG plots a person would rather look at than read: recall bars, loss curves, per-prompt maps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mpe.files.atomic import atomic_path  # noqa: E402


def _save(fig, target: Path) -> Path:
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return target


def recall_bars(results: dict[str, dict], keys: list[str], target: Path, title: str) -> Path:
    """Grouped bars: one group per metric key, one bar per model (``results[model][key]``)."""
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(keys)), 3.6))
    models = list(results)
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        vals = [results[m].get(k, 0.0) for k in keys]
        bars = ax.bar([x + i * width for x in range(len(keys))], vals, width, label=m)
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(keys))])
    ax.set_xticklabels(keys, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, target)


def loss_curves(history: list[dict], target: Path) -> Path:
    """Training loss terms and learning rate against step."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    steps = [h["step"] for h in history]
    for key in ("loss", "contrastive", "diversity", "negation"):
        if history and key in history[0]:
            a.plot(steps, [h[key] for h in history], label=key)
    a.set_xlabel("step")
    a.set_title("training loss")
    a.legend(fontsize=8)
    if history and "lr" in history[0]:
        b.plot(steps, [h["lr"] for h in history], color="tab:gray")
        b.set_title("learning rate")
        b.set_xlabel("step")
    return _save(fig, target)


def prompt_maps(images, maps, captions: list[str], target: Path) -> Path:
    """Per-prompt patch similarity maps: one row per image, the image then one map per prompt."""
    n, k = len(images), maps.shape[1]
    fig, axes = plt.subplots(n, k + 1, figsize=(1.6 * (k + 1), 1.7 * n), squeeze=False)
    for r in range(n):
        axes[r, 0].imshow(images[r])
        axes[r, 0].set_title(captions[r][:40], fontsize=5)
        for c in range(k):
            axes[r, c + 1].imshow(maps[r, c], cmap="magma")
            if r == 0:
                axes[r, c + 1].set_title(f"APT-{c + 1}", fontsize=7)
        for ax in axes[r]:
            ax.axis("off")
    return _save(fig, target)
