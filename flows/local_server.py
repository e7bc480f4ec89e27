"""A Prefect server for one command, on 127.0.0.1, in a process group of its own.

Prefect's own temporary server shares the terminal's process group, so a Ctrl-C kills it and the
interrupted flow can no longer record that it stopped. This one survives the Ctrl-C, sees the flow
marked failed, and is stopped when the command ends. Not used when ``PREFECT_API_URL`` points at a
server already.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from mpe.errors import MpeError
from mpe.tracking_server import free_port


def _flush_logs() -> None:
    if "prefect" not in sys.modules:
        return
    try:
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()
    except Exception:  # a log that cannot be sent must not hide the command's own outcome
        pass


@contextmanager
def prefect_server(timeout: float = 120.0):
    """Yield the API URL of a running server (the configured one, or one started here for the block)."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    port = free_port()
    home = Path(os.environ.get("PREFECT_HOME", ".prefect"))
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "server.log", "ab")
    prefect = Path(sys.executable).parent / "prefect"
    server = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "PREFECT_UI_ENABLED": "false",
                                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise MpeError(f"the Prefect server did not start (see {home / 'server.log'})") from None
                time.sleep(0.5)
        os.environ["PREFECT_API_URL"] = url
        yield url
    finally:
        _flush_logs()  # the flow's last log lines go to the server before it stops
        os.environ.pop("PREFECT_API_URL", None)
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(server.pid, sig)
                server.wait(wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        log.close()
