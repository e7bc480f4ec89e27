"""The whole flow under faults: Ctrl-C stops `mpe run` within seconds, registers nothing and the rerun
resumes, while a second `mpe run` is refused and a third (--wait) waits its turn; a held DVC lock is a
one-line error; an output edited in place does not corrupt DVC's copy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import mlflow
import pytest

from tests.e2e.project import BIN, fault_project, own_server_env, registered_models, run, start_mpe_run
from tests.project_config import has_intact_checkpoint, unexpected_tracebacks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def proj(tmp_path_factory, tiny_base_dir):
    return fault_project(tmp_path_factory, tiny_base_dir, "faults")


def test_ctrl_c_stops_the_run_registers_nothing_and_the_rerun_resumes(proj):
    env = own_server_env(proj)
    p = start_mpe_run(proj, env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not has_intact_checkpoint(proj / "ray_results"):
        assert p.poll() is None, p.communicate()[1][-3000:]
        time.sleep(0.5)
    started = time.monotonic()
    os.killpg(p.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground process group
    out, err = p.communicate(timeout=300)
    stopped = time.monotonic() - started
    assert p.returncode == 130, (p.returncode, err[-3000:])
    assert "interrupted" in err and "resume" in err and stopped < 90, (stopped, err[-2000:])
    assert not unexpected_tracebacks(out + err), (out + err)[-3000:]  # Prefect logs the Interrupted as its one line
    assert registered_models(proj) == [] and not (proj / "metrics" / "register.json").exists()

    # the rerun, and two more `mpe run` started while it runs: one stops at once, one waits its turn
    first = subprocess.Popen(
        [str(BIN / "mpe"), "run"], cwd=proj, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lock = proj / ".mpe" / "run.lock"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (lock.exists() and f'"pid": {first.pid}' in lock.read_text()):
        assert first.poll() is None, first.communicate()[1][-3000:]
        time.sleep(0.2)
    second = subprocess.run([str(BIN / "mpe"), "run"], cwd=proj, env=env, capture_output=True, text=True, timeout=120)
    third = subprocess.Popen(
        [str(BIN / "mpe"), "run", "--wait"],
        cwd=proj,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = first.communicate(timeout=900)
    assert first.returncode == 0, err[-3000:]
    last = [line for line in second.stderr.splitlines() if line.strip()][-1]
    assert (
        second.returncode == 2 and "another pipeline run holds this project" in last and f"pid {first.pid}" in last
    ), second.stderr[-2000:]
    out3, err3 = third.communicate(timeout=600)
    assert third.returncode == 0 and "waiting for the run" in err3, err3[-3000:]
    train = json.loads((proj / "metrics" / "train.json").read_text())
    assert train["steps"] == 40 and train["restored_from_step"] >= 2
    assert [m.name for m in registered_models(proj)] == ["mpe-faults"]
    versions = mlflow.MlflowClient().search_model_versions("name = 'mpe-faults'")
    assert [str(v.version) for v in versions] == ["1"]  # the waiting run found nothing changed: no second version
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
