"""DVC from Python: the pipeline's stage list (read from ``dvc.yaml``, defined nowhere else), and
``repro``/``push``/``pull``/``status`` with their output streamed line by line (into a Prefect log, say)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

import yaml

from mpe.errors import Interrupted, MpeError


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


def _quiet_env() -> dict:
    """The environment for DVC: no analytics even where a project's .dvc/config does not turn them off."""
    return {**os.environ, "DVC_NO_ANALYTICS": "1"}


def _stop(proc: subprocess.Popen, grace: float = 60.0) -> None:
    """Interrupt the command's whole process group (the stage and what it started), then make sure it ends."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _dvc(args: list[str], project: Path, log: Callable[[str], None] = print) -> None:
    env = {**_quiet_env(), "TQDM_MININTERVAL": "5", "PYTHONUNBUFFERED": "1"}
    # mpe's own CLI must be the one in this environment, whatever PATH says
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # its own process group: a Ctrl-C reaches it through us, once, and we know it was one
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", *args],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    tail: deque[str] = deque(maxlen=40)
    assert proc.stdout is not None
    try:
        for chunk in proc.stdout:
            for line in re.split(r"[\r\n]+", chunk):
                if line.strip():
                    tail.append(line)
                    log(line)
        proc.wait()
    except KeyboardInterrupt:
        _stop(proc)
        raise Interrupted(
            f"interrupted `dvc {' '.join(args)}`; finished work is kept (checkpoints, cache shards) "
            "and the next run resumes it"
        ) from None
    if proc.returncode != 0:
        text = "\n".join(tail)
        if "Unable to acquire lock" in text or "lock" in text.lower() and "acquire" in text.lower():
            raise DvcError(
                f"{project}: another DVC command (or `mpe run`) holds the project's lock; wait for it "
                "to finish, or if none is running remove .dvc/tmp/rwlock and .dvc/tmp/lock"
            )
        raise DvcError(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}) in {project}:\n" + text)


def repro_stage(stage: str, project: Path, log: Callable[[str], None] = print) -> None:
    """``dvc repro --single-item STAGE``: rerun it only if its deps, params or outs changed."""
    _dvc(["repro", "--single-item", stage], project, log)


def push(project: Path, remote: str | None = None, log: Callable[[str], None] = print) -> None:
    _dvc(["push"] + (["--remote", remote] if remote else []), project, log)


def pull(project: Path, targets: list[str] = (), remote: str | None = None, log: Callable[[str], None] = print) -> None:
    _dvc(["pull", *(["--remote", remote] if remote else []), *targets], project, log)


def changed_outputs(project: Path, targets: list[str] = ()) -> list[str]:
    """The outputs (of ``targets``' stages, or all) whose workspace bytes differ from ``dvc.lock``; changed
    code or params deps are not counted: they say the pipeline would run again, not that outputs differ."""

    out = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json", *targets],
        cwd=project,
        capture_output=True,
        text=True,
        env=_quiet_env(),
    )
    if out.returncode != 0:
        raise DvcError(f"`dvc status` failed in {project}: {out.stderr.strip()[-2000:]}")
    changed = []
    for entries in (json.loads(out.stdout or "{}") or {}).values():
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and "changed outs" in entry:
                changed += [f"{path} ({what})" for path, what in entry["changed outs"].items()]
    return changed
