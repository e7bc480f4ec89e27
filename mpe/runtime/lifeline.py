"""What a command starts ends with it, however the command ends.

``mpe run`` starts processes in sessions of their own (the Prefect server; ``dvc repro``, and below it
``mpe train`` and its Ray cluster), so that a Ctrl-C reaches each of them once, through the command, which
then stops them in order. A command killed outright (``kill -9``, the OOM killer) cannot do that. So a
command that starts such processes becomes their *owner*: every process below it inherits
``MPE_OWNER=<pid>.<start time>``, and a small watcher process, in a session of its own (a signal to the
command's process group does not reach it), waits for the owner to end and then stops every process that
still carries its mark, the way a Ctrl-C would (SIGINT to each process group the owner started, then
SIGTERM, then SIGKILL). After a clean exit that is nothing. Should the watcher be killed as well, the next
owner stops what a dead owner left before it starts anything (:func:`reap_dead_owners`).

SIGTERM (``timeout``, ``kill``, a scheduler's stop) is taken as a Ctrl-C: the command stops its stages,
keeps finished work, and a rerun resumes (:func:`terminate_as_interrupt`).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

OWNER_ENV = "MPE_OWNER"


def _stat(pid: int) -> list[str] | None:
    """Fields 3… of ``/proc/<pid>/stat`` (state, ppid, pgrp, session, …), or None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def token_of(pid: int) -> str | None:
    """``<pid>.<start time>``: names one process, never a later one that reuses its pid."""
    fields = _stat(pid)
    return f"{pid}.{fields[19]}" if fields else None


def alive(token: str) -> bool:
    pid = int(token.split(".", 1)[0])
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and token_of(pid) == token


def _owners() -> dict[int, str]:
    """``{pid: owner token}`` of every process (we may read) that carries an owner's mark."""
    out = {}
    needle = f"{OWNER_ENV}=".encode()
    for d in Path("/proc").glob("[0-9]*"):
        try:
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        for item in env.split(b"\0"):
            if item.startswith(needle):
                out[int(d.name)] = item[len(needle) :].decode(errors="replace")
                break
    return out


def marked(token: str) -> list[int]:
    """The live processes that carry ``token``'s mark, and every process below them (one that rewrote its
    environment with its process title, as Ray's workers do, no longer shows the mark); this process
    excluded."""
    parents = {}
    for d in Path("/proc").glob("[0-9]*"):
        fields = _stat(int(d.name))
        if fields and fields[0] != "Z":
            parents[int(d.name)] = int(fields[1])
    found = {pid for pid, t in _owners().items() if t == token and pid in parents}
    todo = list(found)
    while todo:
        parent = todo.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                todo.append(pid)
    found.discard(os.getpid())
    return sorted(found)


def _ignores(pid: int, sig: int) -> bool:
    """Whether process ``pid`` ignores signal ``sig`` (``SigIgn`` in ``/proc/<pid>/status``)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def _signal(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _wait_gone(token: str, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    left = marked(token)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = marked(token)
    return left


def stop_marked(token: str, interrupt_grace: float = 30.0, term_grace: float = 10.0) -> list[int]:
    """Stop every process that carries ``token``'s mark as a Ctrl-C would: SIGINT to each process group
    whose leader is one of them (the sessions the owner started: a stage stops its Ray cluster, DVC its
    stage), then SIGTERM, then SIGKILL to what is left. Returns the pids that were running."""
    found = marked(token)
    if not found:
        return []
    interrupted = False
    for pid in found:
        fields = _stat(pid)
        # a process group leader (one we started in a session of its own) that a SIGINT stops: a background
        # job's processes ignore it, and are left to SIGTERM at once
        if fields and int(fields[2]) == pid and not _ignores(pid, signal.SIGINT):
            try:
                os.killpg(pid, signal.SIGINT)
                interrupted = True
            except OSError:
                pass
    left = _wait_gone(token, interrupt_grace) if interrupted else found
    if left:
        _signal(left, signal.SIGTERM)
        left = _wait_gone(token, term_grace)
    while left:  # SIGKILL until nothing is left: a dying process may still start one
        _signal(left, signal.SIGKILL)
        left = _wait_gone(token, 2.0)
    return found


def reap_dead_owners(**grace) -> dict[str, list[int]]:
    """Stop what owners that are no longer alive left running; ``{owner token: pids}``."""
    dead = {t for t in set(_owners().values()) if not alive(t)}
    return {t: pids for t in sorted(dead) if (pids := stop_marked(t, **grace))}


def _wait_for_exit(pid: int, token: str) -> None:
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            if alive(token):  # the pidfd names this very process only if it had not ended before it was opened
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                while not poller.poll(None):
                    pass
        finally:
            os.close(fd)
    while alive(token):
        time.sleep(0.5)


def watch(token: str) -> None:
    """Wait for the owner ``token`` to end, then stop what carries its mark."""
    _wait_for_exit(int(token.split(".", 1)[0]), token)
    stop_marked(token)


def own(say=None) -> str:
    """Make this process the owner of every process it starts from now on, with a watcher that stops them
    when it ends; first stop what dead owners left (``say`` reports it). Inside another owner's tree
    (``mpe train`` under ``mpe run``) nothing changes: that owner's mark and watcher cover it."""
    inherited = os.environ.get(OWNER_ENV)
    if inherited and alive(inherited):
        return inherited
    for owner, pids in reap_dead_owners().items():
        if say:
            say(f"stopped {len(pids)} process(es) that a killed mpe command (pid {owner.split('.')[0]}) left running")
    token = token_of(os.getpid())
    env = {k: v for k, v in os.environ.items() if k != OWNER_ENV}
    subprocess.Popen(
        [sys.executable, "-m", "mpe.runtime.lifeline", token],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a signal to the owner's process group does not reach it
        close_fds=True,
    )
    os.environ[OWNER_ENV] = token
    return token


_terminated: list[int] = []


def terminate_as_interrupt() -> None:
    """SIGTERM raises KeyboardInterrupt in the main thread, once, as a Ctrl-C does: the command stops its stages
    and keeps finished work (a second SIGTERM does not interrupt that cleanup)."""

    def handler(signum, frame):
        if _terminated:
            return
        _terminated.append(signum)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)


def record_signal(signum: int) -> None:
    """Note that a signal stopped the command, where another handler caught it (Prefect's own SIGTERM handler
    while a flow runs), so the command's last line and exit status name it."""
    if not _terminated:
        _terminated.append(signum)


def terminated_by() -> int | None:
    """The signal that stopped this command through :func:`terminate_as_interrupt`, if one did."""
    return _terminated[0] if _terminated else None


if __name__ == "__main__":
    watch(sys.argv[1])
