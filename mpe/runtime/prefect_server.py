"""Prefect for the ``mpe`` commands: a server for one command (on 127.0.0.1, in a process group of its
own), the project's flows loaded by path (``flows/<name>.py``, as Prefect loads a deployment's
entrypoint), serving a flow on a schedule, and the process work pool.

Prefect's own temporary server shares the terminal's process group, so a Ctrl-C kills it and the
interrupted flow can no longer record that it stopped. This one survives the Ctrl-C, sees the flow
marked failed, and is stopped when the command ends. Not used when ``PREFECT_API_URL`` points at a
server already.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from mpe.errors import MpeError
from mpe.runtime.loopback import free_port


class _UserErrorsInOneLine(logging.Filter):
    """Prefect logs a failed flow or task with its traceback; for an :class:`MpeError` (a Ctrl-C, bad input,
    a failed DVC stage) the message already names the file and what to do, so the traceback goes (a bug
    keeps its own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], MpeError):
            record.exc_info, record.exc_text = None, None
        return True


def one_line_user_errors() -> None:
    """Make Prefect's flow and task run loggers log an :class:`MpeError` as its one line (idempotent)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _UserErrorsInOneLine) for f in logger.filters):
            logger.addFilter(_UserErrorsInOneLine())


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
    server = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
    )
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


def load_flow(project_dir: str | Path, entrypoint: str):
    """The flow ``entrypoint`` (``retrain.py:retrain``) of the project's ``flows/`` folder, loaded by path as
    Prefect loads a deployment's entrypoint (``flows/`` is not an installed package)."""
    from prefect.flows import load_flow_from_entrypoint

    file, _, name = entrypoint.partition(":")
    path = Path(project_dir).resolve() / "flows" / file
    if not path.is_file():
        raise MpeError(
            f"{path}: no such flow file; run mpe from the project folder (it holds flows/, dvc.yaml and params.yaml)"
        )
    return load_flow_from_entrypoint(f"{path}:{name}")


def serve_on_schedule(flow, name: str, cron: str, parameters: dict) -> None:
    """Serve ``flow`` on ``cron`` from this process, one run at a time (Ctrl-C stops it)."""
    flow.serve(name=name, cron=cron, global_limit=1, parameters=parameters)


def ensure_work_pool(name: str = "local-process") -> None:
    """Create the process work pool through Prefect's API.

    ``prefect work-pool create`` asks the server for the pool types it knows, and the server fetches
    Prefect's collection registry from GitHub for that; this call needs no network.
    """
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    async def create() -> None:
        async with get_client() as client:
            try:
                await client.create_work_pool(
                    WorkPoolCreate(
                        name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()
                    )
                )
            except ObjectAlreadyExists:
                pass

    anyio.run(create)


def user_interfaces(
    tracking_uri: str, artifact_location: str | None, mlflow_port: int = 5000, prefect_port: int = 4200
) -> None:
    """The MLflow UI and Prefect's UI on 127.0.0.1 until Ctrl-C. A tracking server (``http(s)://``) is its
    own UI: only its address is printed; a store this machine opens (sqlite) gets ``mlflow ui``."""
    bin_dir = Path(sys.executable).parent
    procs, env = (
        [],
        {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
    )
    if tracking_uri.split("://", 1)[0].lower() in ("http", "https"):
        print(f"MLflow: {tracking_uri} (the tracking server's own UI)")
    else:
        cmd = [
            str(bin_dir / "mlflow"),
            "ui",
            "--backend-store-uri",
            tracking_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
        ]
        if artifact_location:
            cmd += ["--default-artifact-root", artifact_location]
        procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
        print(f"MLflow: http://127.0.0.1:{mlflow_port} ({tracking_uri})")
    procs.append(
        subprocess.Popen(
            [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            env=env,
            start_new_session=True,
        )
    )
    print(f"Prefect: http://127.0.0.1:{prefect_port}   (Ctrl-C stops both)", flush=True)
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
    finally:
        for p in procs:
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(p.pid, sig)
                    p.wait(wait)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
