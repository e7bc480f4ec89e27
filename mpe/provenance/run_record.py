"""Each run's outputs, versioned: after the flow has pushed them, the run's ``dvc.lock`` (the hashes of
every output), ``params.yaml``, ``dvc.yaml`` and the small outputs DVC does not cache (the metrics
files) are committed on the branch ``mpe/runs`` — with git's
plumbing, so the working tree, the index and the user's branch are never touched. The commit's parents
are the code commit (HEAD) and the previous run, so ``git log mpe/runs`` lists the runs. A clone gets
the branch with everything else; ``mpe reproduce`` reads it back."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

RUNS_BRANCH = "mpe/runs"
RECORDED = ("dvc.yaml", "dvc.lock", "params.yaml")


def recorded_files(project: Path) -> list[str]:
    """What a run record holds: the pipeline, lock and params, and every ``cache: false`` output."""
    import yaml

    names = list(RECORDED)
    dvc_yaml = Path(project) / "dvc.yaml"
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}) if dvc_yaml.exists() else {}
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind) or []:
                if isinstance(out, dict):
                    ((path, opts),) = out.items()
                    if isinstance(opts, dict) and opts.get("cache") is False:
                        names.append(path)
    return names


class NotAGitRepository(Exception):
    pass


def _git(project: Path, *args: str, env: dict | None = None, data: str | None = None) -> str:
    out = subprocess.run(
        ["git", *args], cwd=project, capture_output=True, text=True, input=data, env={**os.environ, **(env or {})}
    )
    if out.returncode != 0:
        raise NotAGitRepository(out.stderr.strip() or f"git {' '.join(args)} failed")
    return out.stdout.strip()


def is_git_repository(project: Path) -> bool:
    try:
        return _git(project, "rev-parse", "--is-inside-work-tree") == "true"
    except (NotAGitRepository, FileNotFoundError):
        return False


def _identity(project: Path) -> dict:
    """An author for the run commit when git has none configured (a CI machine, say)."""
    env = {}
    for key, var in (("user.name", "NAME"), ("user.email", "EMAIL")):
        try:
            _git(project, "config", key)
        except NotAGitRepository:
            value = "mpe" if var == "NAME" else "mpe@localhost"
            env[f"GIT_AUTHOR_{var}"] = env[f"GIT_COMMITTER_{var}"] = value
    return env


def record_run(project: Path, label: str) -> dict | None:
    """Commit the run's lock, params and pipeline on ``mpe/runs``; returns ``{"ref", "commit", "code"}``, or
    None when the project is not a git repository (the MLflow artifacts are then the record)."""
    project = Path(project)
    if not is_git_repository(project):
        return None
    head = _git(project, "rev-parse", "HEAD")
    prefix = _git(project, "rev-parse", "--show-prefix")  # the project may be a folder of a larger repository
    with tempfile.TemporaryDirectory() as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        _git(project, "read-tree", head, env=env)
        for name in recorded_files(project):
            if (project / name).exists():
                blob = _git(project, "hash-object", "-w", name)
                _git(project, "update-index", "--add", "--cacheinfo", f"100644,{blob},{prefix}{name}", env=env)
        tree = _git(project, "write-tree", env=env)
    parents = ["-p", head]
    try:
        previous = _git(project, "rev-parse", "--verify", "--quiet", f"refs/heads/{RUNS_BRANCH}")
    except NotAGitRepository:
        previous = None
    if previous:
        if (
            _git(project, "rev-parse", f"{previous}^{{tree}}") == tree
            and _git(project, "rev-parse", f"{previous}^1") == head
        ):
            return {"ref": RUNS_BRANCH, "commit": previous, "code": head}  # a rerun that changed nothing
        parents += ["-p", previous]
    commit = _git(
        project,
        "commit-tree",
        tree,
        *parents,
        "-m",
        f"mpe run {label}: outputs (dvc.lock) and params",
        env=_identity(project),
    )
    _git(project, "update-ref", f"refs/heads/{RUNS_BRANCH}", commit)
    return {"ref": RUNS_BRANCH, "commit": commit, "code": head}


def read_recorded(project: Path, commit: str, name: str) -> str | None:
    """A recorded file's text at ``commit`` (fetching the runs branch from ``origin`` if the commit is not
    here yet), or None if the commit holds no such file."""
    try:
        _git(project, "cat-file", "-e", f"{commit}^{{commit}}")
    except NotAGitRepository:
        try:
            _git(project, "fetch", "--quiet", "origin", f"{RUNS_BRANCH}:refs/remotes/origin/{RUNS_BRANCH}")
        except NotAGitRepository:
            pass
    try:
        return subprocess.run(
            ["git", "show", f"{commit}:./{name}"], cwd=project, capture_output=True, text=True, check=True
        ).stdout
    except subprocess.CalledProcessError:
        return None
