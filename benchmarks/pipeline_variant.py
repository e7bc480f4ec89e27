"""One variant of a finished project: its params with some keys changed, written under ``bench/<tag>``,
then the cache, train and evaluate stages run on it; returns the trained model's test R@1/R@5."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

RECALLS = ("text_to_image_R@1", "text_to_image_R@5", "image_to_text_R@1", "image_to_text_R@5")


def run_variant_stages(project: Path, tag: str, change) -> tuple[dict, dict]:
    """``change(params)`` edits the loaded params in place; returns ``(params written, recalls)``."""
    base = yaml.safe_load((project / "params.yaml").read_text())
    change(base)
    base["train"]["out_dir"] = f"bench/{tag}/trained"
    base["train"]["run_name"] = f"bench-{tag}"
    base["evaluate"]["out_dir"] = f"bench/{tag}/metrics"
    base["evaluate"]["plots_dir"] = f"bench/{tag}/plots"
    path = project / "bench" / f"{tag}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(base))
    mpe = Path(sys.executable).parent / "mpe"
    for stage in ("cache", "train", "evaluate"):
        out = subprocess.run([str(mpe), "--params", str(path), stage], cwd=project, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{tag} {stage}: {out.stderr[-2000:]}")
    ev = json.loads((project / base["evaluate"]["out_dir"] / "eval.json").read_text())["trained"]
    return base, {k: ev[k] for k in RECALLS}
