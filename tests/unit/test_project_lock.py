"""One run per project: the lock names its holder, waits on request, never outlives a killed holder; runs a
killed process left RUNNING in MLflow are marked failed, others are left alone."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from mpe.errors import ProjectBusy
from mpe.runtime.project_lock import LOCK_FILE, project_identity, project_lock

HOLD = (
    "import sys, time\nfrom mpe.runtime.project_lock import project_lock\n"
    "with project_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(float(sys.argv[2]))\n"
)


def _holder(project, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(project), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_run_is_refused_with_the_holder_named_and_a_killed_holder_frees_it(tmp_path):
    holder = _holder(tmp_path, 120)
    try:
        with pytest.raises(ProjectBusy) as err:
            with project_lock(tmp_path, wait=0):
                pass
        assert f"pid {holder.pid}" in str(err.value) and str(tmp_path) in str(err.value) and "--wait" in str(err.value)
        started = time.monotonic()
        with pytest.raises(ProjectBusy):
            with project_lock(tmp_path, wait=1.0):
                pass
        assert time.monotonic() - started >= 1.0
        holder.send_signal(signal.SIGKILL)  # no clean-up code runs: the kernel releases the flock
        holder.wait()
        with project_lock(tmp_path, wait=0):
            assert (tmp_path / LOCK_FILE).read_text().startswith("{")
    finally:
        holder.kill()
        holder.wait()


def test_a_waiting_run_starts_when_the_holder_ends_and_says_it_waited(tmp_path):
    holder = _holder(tmp_path, 1.5)
    said, started = [], time.monotonic()
    try:
        with project_lock(tmp_path, wait=None, say=said.append):
            assert time.monotonic() - started >= 1.0  # in only once the holder let go
    finally:
        holder.wait()
    assert len(said) == 1 and f"pid {holder.pid}" in said[0]


def test_the_lock_is_reentrant_in_one_process_and_released_after(tmp_path):
    with project_lock(tmp_path):
        with project_lock(tmp_path, wait=0):
            pass
        probe = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path), "0"], capture_output=True, text=True)
        assert probe.returncode != 0 and "ProjectBusy" in probe.stderr  # still held by the outer block
    assert (tmp_path / LOCK_FILE).read_text() == ""
    probe = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path), "0"], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr


def test_runs_a_killed_process_left_running_are_marked_failed(tmp_path):
    import mlflow

    from mpe.tracking.runs import fail_abandoned_runs
    from mpe.tracking.settings import TrackingSettings

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    settings = TrackingSettings(tracking_uri=uri, experiment="e", artifact_location=str(tmp_path / "art"))
    assert fail_abandoned_runs(settings, {"mpe.project": "x"}) == []  # no experiment yet: nothing to do
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "art"))
    ours = client.create_run(exp, tags={"mpe.project": project_identity(tmp_path)}).info.run_id
    other = client.create_run(exp, tags={"mpe.project": project_identity(tmp_path / "other")}).info.run_id
    done = client.create_run(exp, tags={"mpe.project": project_identity(tmp_path)}).info.run_id
    client.set_terminated(done)
    marked = fail_abandoned_runs(settings, {"mpe.project": project_identity(tmp_path)})
    assert marked == [ours]
    assert client.get_run(ours).info.status == "FAILED" and "killed" in client.get_run(ours).data.tags["mpe.end_reason"]
    assert client.get_run(other).info.status == "RUNNING" and client.get_run(done).info.status == "FINISHED"
