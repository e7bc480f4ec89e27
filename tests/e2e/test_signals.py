"""The whole flow under signals and a damaged store: SIGTERM stops `mpe run` as Ctrl-C does, `kill -9` leaves
nothing running, the rerun resumes from the last checkpoint; a truncated `mlruns.db` is one line naming it
and an emptied one gets the finished training logged anew. (A project of its own: the Ctrl-C tests in
test_interrupt.py run beside these on another worker.)"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest

from tests.e2e.project import BIN, fault_project, own_server_env, run, start_mpe_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def proj(tmp_path_factory, tiny_base_dir):
    return fault_project(tmp_path_factory, tiny_base_dir, "signals")


def _newest_step(ray_results, skip: set[str]) -> int:
    """The step of the newest intact checkpoint among the Ray runs not in ``skip``."""
    from mpe.training.checkpoint import newest_intact

    steps = [0]
    for d in ray_results.glob("*"):
        found = newest_intact(d) if d.is_dir() and d.name not in skip else None
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


def _until_step(p, proj, skip: set[str], step: int) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and _newest_step(proj / "ray_results", skip) < step:
        assert p.poll() is None, p.communicate()[1][-3000:]
        time.sleep(0.5)
    assert _newest_step(proj / "ray_results", skip) >= step


def test_sigterm_stops_the_run_as_ctrl_c_does_and_kill_9_leaves_nothing_running_and_the_rerun_resumes(proj):
    """`kill` (SIGTERM, what `timeout` sends) to `mpe run` alone: it stops as a Ctrl-C stops it, and nothing
    it started keeps running (the Prefect server, DVC, the stage, Ray). `kill -9` of `mpe run` alone: nothing
    it started runs on for long. The run after both resumes from the last checkpoint."""
    import yaml

    env = own_server_env(proj)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["train"]["lr"] = 5e-4  # a new training run
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    earlier = {d.name for d in (proj / "ray_results").iterdir()} if (proj / "ray_results").is_dir() else set()
    mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlruns.db'}")
    versions = [str(m.version) for m in mlflow.MlflowClient().search_model_versions("name = 'mpe-faults'")]

    def mpe_run():  # the signal goes to `mpe run` alone (send_signal), not to its process group
        return start_mpe_run(proj, env)

    first = mpe_run()
    _until_step(first, proj, earlier, 2)
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 143 and "stopped by SIGTERM" in err and "resume" in err, err[-3000:]
    assert _left_running(proj, 60) == []
    reached = _newest_step(proj / "ray_results", earlier)
    assert (
        not (proj / "metrics" / "register.json").exists()
        or json.loads((proj / "metrics" / "register.json").read_text())["version"] in versions
    )  # nothing new registered

    second = mpe_run()
    _until_step(second, proj, earlier, reached + 2)  # resumed, and went on
    second.kill()  # SIGKILL, `mpe run` alone: nothing can clean up in it
    second.communicate(timeout=60)
    assert _left_running(proj, 120) == []

    run([str(BIN / "mpe"), "run"], proj, env, timeout=900)
    train = json.loads((proj / "metrics" / "train.json").read_text())
    assert train["steps"] == 40 and train["restored_from_step"] >= reached + 2, train
    assert json.loads((proj / "metrics" / "register.json").read_text())["version"] not in versions
    assert _left_running(proj, 60) == []


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
