"""The whole flow under faults, on one project: Ctrl-C stops `mpe run` within seconds, SIGTERM stops it as Ctrl-C
does, `kill -9` leaves nothing running, and each rerun resumes from the last checkpoint, registering nothing until
a run finishes; while the finishing run runs, a second `mpe run` is refused and a third (--wait) waits its turn. A
held DVC lock is a one-line error; an output edited in place does not corrupt DVC's copy; a truncated `mlruns.db`
is one line naming it and an emptied one gets the finished training logged anew. (One project for all: each stop
resumes the run the one before it left, so the flow's data, cache and finished training are made once.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest

from tests.e2e.project import BIN, fault_project, own_server_env, registered_models, run, start_mpe_run
from tests.project_config import unexpected_tracebacks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def proj(tmp_path_factory, tiny_base_dir):
    return fault_project(tmp_path_factory, tiny_base_dir, "faults")


def _newest_step(ray_results) -> int:
    """The step of the newest intact checkpoint among the project's Ray runs (0 before any)."""
    from mpe.training.checkpoint import newest_intact

    steps = [0]
    for d in ray_results.glob("*"):
        found = newest_intact(d) if d.is_dir() else None
        if found:
            steps.append(found[1][2]["step"])
    return max(steps)


def _left_running(proj, seconds: float) -> list[str]:
    """What still runs of this project (a process whose command line or environment names its folder, as every
    process `mpe run` starts does, through PREFECT_HOME) once ``seconds`` have passed without it ending."""
    from tests.session_temp import _processes_naming

    deadline = time.monotonic() + seconds
    while _processes_naming(proj) and time.monotonic() < deadline:
        time.sleep(0.5)
    out = []
    for pid in _processes_naming(proj):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out.append(f"{pid}: {cmdline[:150]}")
    return out


def _until_step(p, proj, step: int) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and _newest_step(proj / "ray_results") < step:
        assert p.poll() is None, p.communicate()[1][-3000:]
        time.sleep(0.5)
    assert _newest_step(proj / "ray_results") >= step


def test_ctrl_c_sigterm_and_kill_9_stop_the_run_and_each_rerun_resumes_registering_nothing_until_one_finishes(proj):
    """Ctrl-C (SIGINT to the run's process group, as a terminal sends it) stops `mpe run` within 90 s, exit 130, one
    line and no traceback. `kill` (SIGTERM, what `timeout` sends) to `mpe run` alone stops it the same way, exit 143,
    and nothing it started keeps running (the Prefect server, DVC, the stage, Ray). `kill -9` of `mpe run` alone:
    nothing it started runs on for long. Each rerun resumes past the checkpoint the one before reached; nothing is
    registered until a run finishes, and that run registers version 1 alone."""
    env = own_server_env(proj)

    # Ctrl-C as soon as a checkpoint reads back whole
    p = start_mpe_run(proj, env)
    _until_step(p, proj, 1)
    started = time.monotonic()
    os.killpg(p.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground process group
    out, err = p.communicate(timeout=300)
    stopped = time.monotonic() - started
    assert p.returncode == 130, (p.returncode, err[-3000:])
    assert "interrupted" in err and "resume" in err and stopped < 90, (stopped, err[-2000:])
    assert not unexpected_tracebacks(out + err), (out + err)[-3000:]  # Prefect logs the Interrupted as its one line
    assert registered_models(proj) == [] and not (proj / "metrics" / "register.json").exists()
    reached = _newest_step(proj / "ray_results")

    # SIGTERM to `mpe run` alone (send_signal), once the rerun went past where Ctrl-C left it
    second = start_mpe_run(proj, env)
    _until_step(second, proj, reached + 2)
    second.send_signal(signal.SIGTERM)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 143 and "stopped by SIGTERM" in err and "resume" in err, err[-3000:]
    assert _left_running(proj, 60) == []
    assert registered_models(proj) == [] and not (proj / "metrics" / "register.json").exists()
    reached = _newest_step(proj / "ray_results")

    # SIGKILL to `mpe run` alone: nothing can clean up in it
    third = start_mpe_run(proj, env)
    _until_step(third, proj, reached + 2)
    third.kill()
    third.communicate(timeout=60)
    assert _left_running(proj, 120) == []
    assert registered_models(proj) == [] and not (proj / "metrics" / "register.json").exists()
    reached = _newest_step(proj / "ray_results")

    # the rerun that finishes, and two more `mpe run` started while it runs: one stops at once, one waits its turn
    first = subprocess.Popen(
        [str(BIN / "mpe"), "run"], cwd=proj, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lock = proj / ".mpe" / "run.lock"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (lock.exists() and f'"pid": {first.pid}' in lock.read_text()):
        assert first.poll() is None, first.communicate()[1][-3000:]
        time.sleep(0.2)
    refused = subprocess.run([str(BIN / "mpe"), "run"], cwd=proj, env=env, capture_output=True, text=True, timeout=120)
    waiting = subprocess.Popen(
        [str(BIN / "mpe"), "run", "--wait"],
        cwd=proj,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = first.communicate(timeout=900)
    assert first.returncode == 0, err[-3000:]
    last = [line for line in refused.stderr.splitlines() if line.strip()][-1]
    assert (
        refused.returncode == 2 and "another pipeline run holds this project" in last and f"pid {first.pid}" in last
    ), refused.stderr[-2000:]
    out3, err3 = waiting.communicate(timeout=600)
    assert waiting.returncode == 0 and "waiting for the run" in err3, err3[-3000:]
    train = json.loads((proj / "metrics" / "train.json").read_text())
    assert train["steps"] == 40 and train["restored_from_step"] >= reached >= 6, (train, reached)
    assert [m.name for m in registered_models(proj)] == ["mpe-faults"]
    versions = mlflow.MlflowClient().search_model_versions("name = 'mpe-faults'")
    assert [str(v.version) for v in versions] == ["1"]  # the waiting run found nothing changed: no second version
    assert _left_running(proj, 60) == []
    from tests.e2e.project import status_clean

    clean, text = status_clean(proj)
    assert clean, text  # every output intact, none half-written


def test_an_output_edited_in_place_leaves_dvc_s_copy_intact(proj):
    from mpe.files.hashing import file_sha256

    shard = sorted((proj / "data" / "shards" / "train").glob("*.tar"))[0]
    original = file_sha256(shard)
    with open(shard, "r+b") as f:
        f.truncate(1000)
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=proj, capture_output=True, text=True)
    assert "modified" in status.stdout and "data" in status.stdout
    run([str(BIN / "dvc"), "checkout", "--force", "data"], proj, own_server_env(proj))
    assert file_sha256(shard) == original


def test_a_held_dvc_lock_is_a_one_line_error(proj):
    holder = subprocess.Popen(
        [
            str(BIN / "python"),
            "-c",
            "import sys, time\nfrom dvc.repo import Repo\n"
            "r = Repo(sys.argv[1]); r.lock.lock(); print('held', flush=True); time.sleep(120)",
            str(proj),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        out = subprocess.run(
            [str(BIN / "mpe"), "run"], cwd=proj, env=own_server_env(proj), capture_output=True, text=True, timeout=300
        )
        last = [line for line in out.stderr.splitlines() if line.strip()][-1]
        # Prefect's own log of the failed task keeps its traceback; what the command ends with is one line
        assert out.returncode == 2 and last.startswith("mpe run: error:") and "holds the project's lock" in last, (
            out.stderr[-2000:]
        )
    finally:
        holder.kill()
        holder.wait()


def test_a_damaged_mlflow_store_is_named_and_an_emptied_one_gets_the_finished_training_logged_anew(proj):
    """A truncated `mlruns.db` stops `mpe run` with one line naming it. An emptied one (0 bytes) is a new
    store: the run says so, trains again (resuming the finished Ray run: no step is trained twice) to log
    the training there, evaluates into that run and registers the model as the new store's version 1."""
    env = own_server_env(proj)
    db = proj / "mlruns.db"
    whole = db.read_bytes()
    trained_before = json.loads((proj / "metrics" / "train.json").read_text())
    db.write_bytes(whole[: len(whole) // 2])
    out = subprocess.run([str(BIN / "mpe"), "run"], cwd=proj, env=env, capture_output=True, text=True, timeout=600)
    last = [line for line in out.stderr.splitlines() if line.strip()][-1]
    assert out.returncode == 2 and last.startswith("mpe run: error:") and str(db) in last, out.stderr[-3000:]

    db.write_bytes(b"")
    out = subprocess.run([str(BIN / "mpe"), "run"], cwd=proj, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "empty (0 bytes)" in out.stdout + out.stderr
    train = json.loads((proj / "metrics" / "train.json").read_text())
    assert train["ray_run_name"] == trained_before["ray_run_name"]
    assert train["restored_from_step"] == train["steps"] == trained_before["steps"]  # resumed, not retrained
    assert train["mlflow_run_id"] != trained_before["mlflow_run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    client = mlflow.MlflowClient()
    run_ = client.get_run(train["mlflow_run_id"])
    assert run_.data.tags["mpe.previous_run_id"] == trained_before["mlflow_run_id"]
    assert any(k.startswith("eval.") for k in run_.data.metrics)  # evaluate logged into the new run
    registered = json.loads((proj / "metrics" / "register.json").read_text())
    assert registered["version"] == "1" and registered["alias"] == "champion"
    assert client.get_model_version("mpe-faults", "1").tags["mlflow_train_run_id"] == train["mlflow_run_id"]
