"""A small pipeline project on disk for the end-to-end tests: the repository's code and pipeline files,
a params file for the tiny base model, a local DVC remote, and a git repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from mpe.runtime.loopback import free_port  # noqa: F401  (the tests' free loopback port)
from tests.project_config import small_params

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COPY = ["mpe", "flows", "dvc.yaml", "prefect.yaml", ".dvcignore", ".dvc/config", ".gitignore"]


def run(cmd, cwd, env, timeout=600) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def git(cwd, *args) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True
    )


def pipeline_params(base: Path, model_name: str = "mpe-e2e", **train) -> dict:
    """Every key written out: DVC checks that the keys dvc.yaml names exist in params.yaml."""
    from mpe.config import Params

    p = small_params(Path(""), base, train={"max_steps": 30, "lr": 2e-3, **train})
    p["register"] = {"model_name": model_name, "margin": 0.0}
    p["dvc"] = {"remote": "localremote"}
    return Params.model_validate(p).model_dump(mode="json", by_alias=True)


def make_project(proj: Path, params: dict) -> tuple[Path, Path]:
    """The project folder (code, pipeline files, params, a git commit) and its DVC remote folder."""
    proj.mkdir(parents=True)
    for item in COPY:
        src, dst = REPO / item, proj / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    remote = proj.parent / f"{proj.name}-dvc-remote"
    cfg = (proj / ".dvc" / "config").read_text().replace("~/.cache/mpe/dvc-remote", str(remote))
    (proj / ".dvc" / "config").write_text(cfg)
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    git(proj, "init", "-q")
    git(proj, "add", "-A")
    git(proj, "commit", "-qm", "project")
    return proj, remote


def project_env(proj: Path, **extra) -> dict:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(proj / ".prefect"),
        **extra,
    }
    return env


def fault_project(tmp_path_factory, tiny_base_dir: Path, name: str) -> Path:
    """A whole project for the fault tests: training long enough (40 steps, a checkpoint every 2) that a signal
    lands mid-training, on one Ray Train worker (what a signal stops is the run's processes, not its ranks)."""
    params = pipeline_params(
        tiny_base_dir, model_name="mpe-faults", max_steps=40, checkpoint_every=2, lr=1e-3, num_workers=1
    )
    return make_project(tmp_path_factory.mktemp(name) / "proj", params)[0]


def start_mpe_run(proj: Path, env: dict) -> subprocess.Popen:
    """`mpe run` in ``proj``, output captured, in a session of its own: a signal the test sends reaches the run
    (its process group, as a terminal's Ctrl-C does, or `mpe run` alone) and never the test."""
    return subprocess.Popen(
        [str(BIN / "mpe"), "run"],
        cwd=proj,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def own_server_env(proj: Path) -> dict:
    """The project's environment without ``PREFECT_API_URL``: `mpe run` starts its own Prefect server, in its
    own process group, as a user's `mpe run` does."""
    env = project_env(proj)
    env.pop("PREFECT_API_URL", None)
    return env


def registered_models(proj: Path) -> list:
    """The registered models of the project's ``mlruns.db`` (none while it does not exist)."""
    import mlflow

    if not (proj / "mlruns.db").exists():
        return []
    mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlruns.db'}")
    return mlflow.MlflowClient().search_registered_models()


def status_clean(project: Path) -> tuple[bool, str]:
    """``dvc status``: clean when every stage is up to date. A stage DVC always reruns by design (``sources``,
    which lists the URL-list parts) is not a change."""
    import json

    out = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"],
        cwd=project,
        capture_output=True,
        text=True,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
    )
    text = out.stdout + out.stderr
    try:
        changes = json.loads(out.stdout or "{}")
    except ValueError:
        return False, text
    changed = {stage: what for stage, what in changes.items() if what != ["always changed"]}
    return out.returncode == 0 and not changed, text
