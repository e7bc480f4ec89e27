"""A server command run as a real process on a free 127.0.0.1 port for the tests that drive it over HTTP
(``mpe serve``, ``mlflow models serve``), stopped with its whole process group however the test ends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from mpe.runtime.loopback import free_port

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def running(command: list[str], cwd: Path, env_extra: dict | None = None):
    """``command`` (a server taking ``--port``) started on a free 127.0.0.1 port; yields an httpx client
    once ``/ping`` answers, and stops the process however the test ends."""
    port = free_port()
    logfile = cwd / f"server-{port}.log"
    # the venv's bin on PATH: mlflow models serve execs `uvicorn`
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        **(env_extra or {}),
    }
    with open(logfile, "w") as log:
        # its own session: mlflow models serve runs uvicorn as a child, which must stop with it
        proc = subprocess.Popen(
            command + ["--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[:3]} exited with {proc.returncode}:\n{logfile.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/ping", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[:3]} did not answer /ping:\n{logfile.read_text()[-3000:]}")
            time.sleep(0.3)
        with httpx.Client(base_url=url, timeout=60) as client:
            client.server_pid = proc.pid  # the memory test reads the server's peak RSS
            yield client
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (the server and any child); SIGKILL what is left after 15 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, so that an empty group reads as gone
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def raw_get(base_url, path: str) -> tuple[int, dict]:
    """``GET path`` through the standard library (httpx refuses URLs over 64 KiB; a browser sends them), and
    the JSON answer."""
    import http.client
    import json

    url = httpx.URL(str(base_url))
    conn = http.client.HTTPConnection(url.host, url.port, timeout=60)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()
