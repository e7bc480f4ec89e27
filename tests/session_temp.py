"""One temporary folder for a whole test run, and reaping what a killed run left behind.

Everything the suite puts outside pytest's own ``tmp_path`` goes under this folder: Ray's default temp
folder (``ray.cluster_utils`` writes ``<RAY_TMPDIR>/ray/ray_current_cluster`` there), the local Ray
clusters' folders, the tracking servers' PostgreSQL clusters, pytest's base temp. So the suite neither
needs nor leaves state in ``/tmp`` itself, and a fresh machine behaves like one that ran it before.

A run that was killed (SIGKILL, a CI timeout) cannot clean up: the next run finds its folder by the
owner pid it recorded, stops the tracking servers inside it, kills its Ray processes and removes it.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

PREFIX = "mpe-test-"
ENV = "MPE_TEST_TMPDIR"  # set by the run that owns the folder; xdist workers inherit it and share it


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _processes_naming(folder: Path) -> list[int]:
    """Processes whose command line or environment names ``folder`` (Ray nodes, servers started in it)."""
    needle, out = str(folder).encode(), []
    for d in Path("/proc").glob("[0-9]*"):
        if int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "cmdline").read_bytes() or needle in (d / "environ").read_bytes():
                out.append(int(d.name))
        except OSError:
            continue
    return out


def reap(folder: Path) -> list[str]:
    """Stop what a dead test run left in ``folder`` (tracking servers, then any process naming the folder)
    and remove it; returns what was stopped."""
    from mpe.tracking.server import stop

    stopped = []
    for state in folder.rglob("server.json"):
        try:
            stopped += stop(state.parent)
        except Exception as err:  # a half-written server folder: the processes are killed below anyway
            stopped.append(f"{state.parent}: {err}")
    for cluster in folder.rglob("cluster.json"):
        if (cluster.parent / "pgdata").is_dir():
            try:
                stopped += stop(cluster.parent)
            except Exception as err:
                stopped.append(f"{cluster.parent}: {err}")
    for pid in _processes_naming(folder):
        try:
            os.kill(pid, signal.SIGKILL)
            stopped.append(f"pid {pid}")
        except OSError:
            pass
    shutil.rmtree(folder, ignore_errors=True)
    return stopped


def reap_stale(base: Path) -> list[str]:
    """Reap every test-run folder under ``base`` whose owner process is gone."""
    out = []
    for folder in sorted(base.glob(f"{PREFIX}*")):
        try:
            owner = int((folder / "owner.pid").read_text())
        except (OSError, ValueError):
            owner = None
        if owner is None or not _pid_alive(owner):
            out += reap(folder)
    return out


def claim() -> tuple[Path, bool]:
    """The run's folder and whether this process owns it (made it, and removes it at the end). The owner
    points ``TMPDIR`` and ``RAY_TMPDIR`` at it, so every process the suite starts inherits it."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]), False
    base = Path(tempfile.gettempdir())
    reaped = reap_stale(base)
    if reaped:
        print(f"tests: stopped what an earlier, killed test run left: {', '.join(reaped)}")
    folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=base))  # short: Ray's socket paths must fit in 107 bytes
    # PostgreSQL runs as an unprivileged OS user under root, and must reach the tracking servers' folders
    folder.chmod(0o755)
    (folder / "owner.pid").write_text(str(os.getpid()))
    (folder / "ray").mkdir()
    os.environ.update({ENV: str(folder), "TMPDIR": str(folder), "RAY_TMPDIR": str(folder)})
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    return folder, True
