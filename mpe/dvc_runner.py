"""DVC from Python: the pipeline's stage list (read from ``dvc.yaml``, defined nowhere else), and
``repro``/``push``/``pull``/``status`` with their output streamed line by line (into a Prefect log, say)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Callable

import yaml

from mpe.errors import MpeError


class DvcError(MpeError):
    """A DVC command failed; the message holds its last lines."""


def stage_names(project: Path) -> list[str]:
    """The stages of ``dvc.yaml``, in the order written (which is the order they run)."""
    dvc_yaml = Path(project) / "dvc.yaml"
    try:
        stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}
    except FileNotFoundError:
        raise DvcError(f"{dvc_yaml}: not found; run from the project directory") from None
    return list(stages)


def _dvc(args: list[str], project: Path, log: Callable[[str], None] = print) -> None:
    env = {**os.environ, "TQDM_MININTERVAL": "5", "PYTHONUNBUFFERED": "1"}
    # mpe's own CLI must be the one in this environment, whatever PATH says
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=project, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: deque[str] = deque(maxlen=40)
    assert proc.stdout is not None
    for chunk in proc.stdout:
        for line in re.split(r"[\r\n]+", chunk):
            if line.strip():
                tail.append(line)
                log(line)
    if proc.wait() != 0:
        raise DvcError(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}) in {project}:\n" + "\n".join(tail))


def repro_stage(stage: str, project: Path, log: Callable[[str], None] = print) -> None:
    """``dvc repro --single-item STAGE``: rerun it only if its deps, params or outs changed."""
    _dvc(["repro", "--single-item", stage], project, log)


def push(project: Path, remote: str | None = None, log: Callable[[str], None] = print) -> None:
    _dvc(["push"] + (["--remote", remote] if remote else []), project, log)


def pull(project: Path, log: Callable[[str], None] = print) -> None:
    _dvc(["pull"], project, log)


def status_clean(project: Path) -> tuple[bool, str]:
    """``dvc status``: clean when every stage is up to date."""
    out = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=project, capture_output=True, text=True)
    text = out.stdout + out.stderr
    return out.returncode == 0 and "up to date" in text, text
