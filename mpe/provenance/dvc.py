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
from mpe.runtime.lifeline import record_signal


class DvcError(MpeError):
    """A DVC command failed; the message is the line that says why, ``output`` its last lines."""

    def __init__(self, message: str, output: str = ""):
        super().__init__(message)
        self.output = output


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


_MPE_ERROR = re.compile(r"^mpe [\w-]+: (error|interrupted)")
# "[Errno 28] No space left on device: 'src' -> 'dst'": the path written is the last one
_OS_ERROR = re.compile(r"\[Errno (\d+)\] [^:']+(?:: '([^']+)'(?: -> '([^']+)')?)?")
# DVC reports some failures and still exits 0: an output it could not copy into its cache (a full disk),
# a push that leaves out files its cache lacks
_SILENT_FAILURES = ("ERROR: failed to transfer", "WARNING: Some of the cache files do not exist")


def failure_line(lines: list[str]) -> str:
    """The one line that says why a DVC command failed, from its last lines: a stage's own ``mpe`` error
    (which names the file and what to do), else an OS error DVC hit itself (a full disk, a read-only or
    busy folder: named with its path), else DVC's last ``ERROR:`` line, else the last line."""
    mpe_lines = [line for line in lines if _MPE_ERROR.match(line)]
    if mpe_lines:
        return mpe_lines[-1].removesuffix(" (--debug shows the traceback)")
    for line in reversed(lines):
        if found := _OS_ERROR.search(line):
            code, path = int(found[1]), found[3] or found[2]
            advice = {28: "free some space", 30: "remount it writable", 16: "mount volumes one level up"}
            return f"{path or 'a file'}: {os.strerror(code).lower()} (met by DVC itself)" + (
                f"; {advice[code]} and rerun (finished work is kept)" if code in advice else ""
            )
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["no output"])[-1].strip()


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
    silent: list[str] = []  # failures DVC reports while exiting 0 (the first few)
    assert proc.stdout is not None
    try:
        for chunk in proc.stdout:
            for line in re.split(r"[\r\n]+", chunk):
                if line.strip():
                    tail.append(line)
                    log(line)
                    if line.startswith(_SILENT_FAILURES) and len(silent) < 5:
                        silent.append(line)
        proc.wait()
    except BaseException as err:
        _stop(proc)  # whatever ends the wait ends DVC and its stage too: nothing runs on in its own session
        signum = getattr(err, "signal", None)  # SIGTERM inside a flow: Prefect raises its TerminationSignal
        if not isinstance(err, KeyboardInterrupt) and not isinstance(signum, int):
            raise
        if signum:
            record_signal(signum)
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
        raise DvcError(
            f"`dvc {' '.join(args)}` failed (exit {proc.returncode}) in {project}: {failure_line(list(tail))}"
            " (its output is above)",
            text,
        )
    if silent and args[0] in ("repro", "push"):
        # outputs missing from DVC's cache would be recorded and registered, yet never reach the remote
        if args[0] == "repro":
            found = next((m for line in silent if (m := _OS_ERROR.search(line))), None)
            why = f"{found[3] or found[2]}: {os.strerror(int(found[1])).lower()}" if found else silent[0]
            what = f"could not copy its outputs into DVC's cache ({why})"
            fix = f"free some space, then run `dvc commit --force {args[-1]}` (the outputs are in the workspace)"
        else:
            what = "left out outputs that DVC's cache lacks (a stage's outputs were never cached)"
            fix = "run `dvc commit --force`, then push again"
        raise DvcError(f"`dvc {' '.join(args)}` in {project} exited 0 but {what}; {fix}", "\n".join(tail))


def repro_stage(stage: str, project: Path, log: Callable[[str], None] = print, force: bool = False) -> None:
    """``dvc repro --single-item STAGE``: rerun it only if its deps, params or outs changed (or ``force``)."""
    _dvc(["repro", "--single-item", *(["--force"] if force else []), stage], project, log)


def push(project: Path, remote: str | None = None, log: Callable[[str], None] = print) -> None:
    _dvc(["push"] + (["--remote", remote] if remote else []), project, log)


def pull(project: Path, targets: list[str] = (), remote: str | None = None, log: Callable[[str], None] = print) -> None:
    _dvc(["pull", *(["--remote", remote] if remote else []), *targets], project, log)


def remote_of(project: Path, name: str | None = None) -> tuple[str | None, str | None]:
    """The DVC remote ``name`` (or the project's default) and its URL, from the project's DVC config (every
    level of it, as DVC itself resolves them)."""
    from dvc.repo import Repo

    try:
        with Repo(str(project)) as repo:
            config = repo.config
            name = name or config["core"].get("remote")
            url = (config["remote"].get(name) or {}).get("url") if name else None
    except Exception:  # not a DVC project, or a config DVC cannot read: nothing to name
        return name, None
    return name, url


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
