"""Where a registered model came from: git commit, the DVC hashes of its inputs and outputs, runs."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import yaml

from mpe.files import storage


def git_commit(project: Path) -> str:
    """HEAD's sha, suffixed ``-dirty`` when tracked files differ from it; ``unknown`` outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=project,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
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


def test_set_sha256(test_shards: str) -> str:
    """Content hash of a test split's shards: two evaluations are comparable only if it matches."""
    h = hashlib.sha256()
    for tar in storage.list_files(test_shards, ".tar"):
        h.update(storage.name(tar).encode())
        h.update(storage.sha256(tar).encode())
    return h.hexdigest()


def lineage_tags(
    project: Path,
    outputs: dict[str, str],
    base_model: str,
    base_model_sha256: str,
    test_shards: str,
    train_info: dict,
    flow_run_id: str | None = None,
) -> dict[str, str]:
    """The tags every registered version carries. ``outputs`` maps a tag (``data``, ``cache``, ``model``,
    ``base_model``) to the DVC output path whose hash it records. ``init_from`` … say where the training
    started: ``scratch``, or ``champion`` with the version whose weights it started from and their sha256."""
    hashes = dvc_out_hashes(project)
    tags = {"git_commit": git_commit(project)}
    tags.update({f"dvc.{name}": hashes.get(path, "") for name, path in outputs.items()})
    tags.update(
        {
            "base_model": base_model,
            "base_model_sha256": base_model_sha256,
            "prefect_flow_run_id": flow_run_id or "",
            "ray_run_name": train_info.get("ray_run_name", ""),
            "mlflow_train_run_id": train_info.get("mlflow_run_id", ""),
            "test_set_sha256": test_set_sha256(test_shards),
        }
    )
    start = train_info.get("start") or {}
    tags.update(
        {
            "init_from": start.get("init_from", "scratch"),
            "init_from_version": start.get("version") or "",
            "init_from_sha256": start.get("weights_sha256") or "",
        }
    )
    return tags
