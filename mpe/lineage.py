"""Where a registered model came from: git commit, DVC output hashes, base model, runs."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import yaml


def git_commit(project: Path) -> str:
    """HEAD's sha, suffixed ``-dirty`` when tracked files differ from it; ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def dvc_out_hashes(project: Path) -> dict[str, str]:
    """``{out path: md5}`` for every stage output recorded in ``dvc.lock``."""
    lock = project / "dvc.lock"
    if not lock.exists():
        return {}
    data = yaml.safe_load(lock.read_text()) or {}
    out = {}
    for stage in (data.get("stages") or {}).values():
        for o in stage.get("outs") or []:
            out[o["path"]] = o.get("md5") or o.get("hash") or ""
    return out


def test_set_sha256(data_root: Path) -> str:
    """Content hash of the test split's shards: two evaluations are comparable only if it matches."""
    h = hashlib.sha256()
    for tar in sorted((data_root / "shards" / "test").glob("*.tar")):
        h.update(tar.name.encode())
        h.update(hashlib.sha256(tar.read_bytes()).hexdigest().encode())
    return h.hexdigest()


def lineage_tags(params, project: Path, flow_run_id: str | None = None) -> dict[str, str]:
    """The tags every registered version carries."""
    from mpe.cache import model_content_hash

    outs = dvc_out_hashes(project)
    train = Path(params.evaluate.out_dir) / "train.json"
    train_info = json.loads(train.read_text()) if train.exists() else {}
    base_dir = Path(params.base_model.out_dir)
    return {
        "git_commit": git_commit(project),
        "dvc.data": outs.get(params.data.out_dir, ""),
        "dvc.cache": outs.get(params.cache.root, ""),
        "dvc.model": outs.get(params.train.out_dir, ""),
        "dvc.base_model": outs.get(params.base_model.out_dir, ""),
        "base_model": params.base_model.name + (f"@{params.base_model.revision}" if params.base_model.revision else ""),
        "base_model_sha256": model_content_hash(base_dir) if base_dir.exists() else "",
        "prefect_flow_run_id": flow_run_id or "",
        "ray_run_name": train_info.get("ray_run_name", ""),
        "mlflow_train_run_id": train_info.get("mlflow_run_id", ""),
        "test_set_sha256": test_set_sha256(Path(params.data.out_dir)),
    }
