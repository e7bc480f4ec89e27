"""The project-local tracking server (``mpe tracking-server``) on a real PostgreSQL: loopback only, MLflow
connects as an unprivileged role with the generated password, which no log, URI or command line holds,
and a second start reuses the running server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpe.config import MlflowConfig
from mpe.tracking.server import Layout, scram_verifier
from mpe.tracking.settings import tracking_settings

REPO = Path(__file__).resolve().parents[2]


def _connect(server, user: str, db: str, password: str | None):
    import psycopg

    return psycopg.connect(
        host="127.0.0.1", port=server["pg_port"], user=user, dbname=db, password=password, connect_timeout=10
    )


def test_mlflow_owns_its_database_as_an_unprivileged_role_and_the_password_stays_in_the_passfile(tracking_server):
    import psycopg

    lay = Layout(tracking_server["dir"])
    assert stat.S_IMODE(lay.passfile.stat().st_mode) == 0o600
    host, port, db, user, password = lay.passfile.read_text().strip().split(":")
    assert (host, int(port), db, user) == ("127.0.0.1", tracking_server["pg_port"], "mlflow", "mlflow")
    with _connect(tracking_server, "mlflow", "mlflow", password) as conn:
        super_, createrole, createdb = conn.execute(
            "select rolsuper, rolcreaterole, rolcreatedb from pg_roles where rolname = current_user"
        ).fetchone()
        owner = conn.execute("select pg_get_userbyid(datdba) from pg_database where datname = 'mlflow'").fetchone()[0]
        tables = {r[0] for r in conn.execute("select tablename from pg_tables where tableowner = 'mlflow'")}
        listen = conn.execute("show listen_addresses").fetchone()[0]
    assert (super_, createrole, createdb) == (False, False, False) and owner == "mlflow"
    assert {"experiments", "runs", "registered_models", "model_versions"} <= tables  # MLflow's schema, its own
    assert listen == "127.0.0.1"
    with pytest.raises(psycopg.OperationalError):  # the role reaches its database alone
        _connect(tracking_server, "mlflow", "postgres", password)
    with pytest.raises(psycopg.OperationalError):  # the superuser has no way in over TCP
        _connect(tracking_server, "postgres", "mlflow", password)
    with pytest.raises(psycopg.OperationalError):
        _connect(tracking_server, "mlflow", "mlflow", password + "x")
    logs = [lay.mlflow_log, lay.pg_log, lay.state, lay.cluster, *lay.pgdata.glob("*.conf")]
    assert all(password not in p.read_text(errors="replace") for p in logs)
    state = json.loads(lay.state.read_text())
    cmdline = Path(f"/proc/{state['pid']}/cmdline").read_bytes().decode()
    assert "postgresql+psycopg://mlflow@127.0.0.1" in cmdline and password not in cmdline


def test_a_second_start_finds_the_running_server(tracking_server):
    lay = Layout(tracking_server["dir"])
    before = json.loads(lay.state.read_text())
    port = tracking_server["uri"].rsplit(":", 1)[1]
    out = subprocess.run(
        [sys.executable, "-m", "mpe.cli", "tracking-server", "start", "--dir", str(lay.root), "--port", port],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "already running" in out.stdout and f"pid {before['pid']}" in out.stdout
    assert json.loads(lay.state.read_text()) == before


def test_scram_verifier_matches_rfc7677_test_vector():
    # RFC 7677 section 3: user "user", password "pencil", salt W22ZaJ0SNY7soEsUEjb6gQ==, 4096 iterations
    v = scram_verifier("pencil", base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="), 4096)
    server_key = v.rsplit(":", 1)[1]
    # ServerSignature in the RFC is HMAC(ServerKey, AuthMessage); check ServerKey through it
    auth = (
        b"n=user,r=rOprNGfwEbeRWgbNEkqO,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    )
    signature = hmac.new(base64.b64decode(server_key), auth, hashlib.sha256).digest()
    assert base64.b64encode(signature).decode() == "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_with_a_tracking_server_the_server_keeps_the_artifacts_unless_the_root_is_a_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = tracking_settings(MlflowConfig(tracking_uri="sqlite:///mlruns.db", artifact_root="mlartifacts"))
    assert local.tracking_uri == f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert local.artifact_location == (tmp_path / "mlartifacts").as_uri()
    served = tracking_settings(MlflowConfig(tracking_uri="http://127.0.0.1:5000", artifact_root="mlartifacts"))
    assert served.tracking_uri == "http://127.0.0.1:5000" and served.artifact_location is None
    s3 = tracking_settings(MlflowConfig(tracking_uri="https://mlflow.example:443", artifact_root="s3://b/mlflow"))
    assert s3.artifact_location == "s3://b/mlflow"


# --- the registry under faults: a registration killed mid-gate, the same model twice at once, two test sets


TINY_MODEL = """
import mlflow.pyfunc


class Tiny(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return model_input


mlflow.models.set_model(Tiny())
"""


@pytest.fixture(scope="module")
def logged_model(tracking_server, tmp_path_factory):
    """One small pyfunc logged (as code: nothing pickled) to the tracking server; versions register its URI."""
    import mlflow

    code = tmp_path_factory.mktemp("tiny-model") / "tiny_model.py"
    code.write_text(TINY_MODEL)
    mlflow.set_tracking_uri(tracking_server["uri"])
    mlflow.set_experiment("mpe-registry-faults")
    with mlflow.start_run():
        return mlflow.pyfunc.log_model(name="model", python_model=str(code), pip_requirements=[]).model_uri


def _metrics(r1: float) -> dict:
    return {"text_to_image_R@1": r1, "image_to_text_R@1": r1}


def _job(tracking_server, tmp_path, tag: str, name: str, model_uri: str, md5: str, r1: float = 0.5) -> Path:
    job = {
        "tracking_uri": tracking_server["uri"],
        "experiment": "mpe-registry-faults",
        "model_name": name,
        "model_uri": model_uri,
        "metrics": _metrics(r1),
        "lineage": {"dvc.model": md5, "test_set_sha256": "t1"},
        "ready": str(tmp_path / f"ready-{tag}"),
        "go": str(tmp_path / "go"),
        "out": str(tmp_path / f"out-{tag}.json"),
    }
    path = tmp_path / f"job-{tag}.json"
    path.write_text(json.dumps(job))
    return path


def _registrant(job: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.e2e.registrant", str(job)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _versions(uri: str, name: str) -> dict[str, dict]:
    import mlflow

    client = mlflow.MlflowClient(uri)
    return {str(v.version): v.tags for v in client.search_model_versions(f"name = '{name}'")}


def test_a_registration_killed_while_its_gate_is_pending_is_finished_by_the_rerun_not_registered_again(
    tracking_server, logged_model, tmp_path
):
    """`kill -9` of a registration whose version exists with its gate pending (here: waiting its turn behind
    a lower version whose process then dies too): the rerun of that registration names the same version and
    decides its gate, and does not wait out register.gate_wait_s (900 s) for the dead lower one."""
    import mlflow

    from mpe.runtime.lifeline import token_of

    uri, name = tracking_server["uri"], "mpe-killed-gate"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # a live registering process
    try:
        mlflow.set_tracking_uri(uri)
        owner = f"{socket.gethostname()}:{token_of(holder.pid)}"
        mlflow.register_model(
            logged_model, name, tags={"dvc.model": "md5-other.dir", "gate.state": "pending", "gate.owner": owner}
        )
        job = _job(tracking_server, tmp_path, "a", name, logged_model, "md5-killed.dir")
        (tmp_path / "go").touch()
        first = _registrant(job)
        deadline = time.monotonic() + 180
        while not any(t.get("dvc.model") == "md5-killed.dir" for t in _versions(uri, name).values()):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
            time.sleep(0.2)
        time.sleep(1)  # inside its wait for the lower version's gate
        first.kill()  # SIGKILL: its version stays pending
        first.wait()
    finally:
        holder.kill()  # the lower version's process dies as well
        holder.wait()
    assert _versions(uri, name)["2"]["gate.state"] == "pending"
    rerun = subprocess.run(
        [sys.executable, "-m", "tests.e2e.registrant", str(job)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    result = json.loads(Path(json.loads(job.read_text())["out"]).read_text())
    versions = _versions(uri, name)
    assert sorted(versions) == ["1", "2"] and result["version"] == "2"  # no third version
    assert versions["2"]["gate.state"] == "decided" and versions["1"]["gate.state"] == "abandoned"
    assert result["alias"] == "champion" and versions["2"]["gate.decision"] in result["reason"]
    assert "abandoned" in rerun.stderr and "version 1" in rerun.stderr  # said, not waited out in silence


def test_the_same_model_registered_twice_at_once_becomes_one_version(tracking_server, logged_model, tmp_path):
    uri, name = tracking_server["uri"], "mpe-twice"
    jobs = [_job(tracking_server, tmp_path, tag, name, logged_model, "md5-twice.dir") for tag in ("a", "b")]
    procs = [_registrant(job) for job in jobs]
    try:
        deadline = time.monotonic() + 180
        while not all(Path(json.loads(j.read_text())["ready"]).exists() for j in jobs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.poll() for p in procs]
            time.sleep(0.05)
        (tmp_path / "go").touch()  # both register at the same moment
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    results = [json.loads(Path(json.loads(j.read_text())["out"]).read_text()) for j in jobs]
    versions = _versions(uri, name)
    assert list(versions) == ["1"] and versions["1"]["gate.state"] == "decided"
    assert [r["version"] for r in results] == ["1", "1"]
    assert sorted(bool(r.get("skipped")) for r in results) == [False, True]
    assert all(r["alias"] == "champion" for r in results)


def test_a_champion_measured_on_another_test_set_is_re_measured_or_not_compared(tracking_server, logged_model):
    """The gate compares two scores on one test set: a champion tagged with another test set's hash is
    re-measured on this one (the callback), and where it cannot be, the new version is not promoted."""
    from mpe.config import RegisterConfig
    from mpe.tracking.gate import gate_score
    from mpe.tracking.registry import register_and_gate
    from mpe.tracking.settings import TrackingSettings

    settings = TrackingSettings(tracking_server["uri"], None, "mpe-registry-faults")
    cfg = RegisterConfig(model_name="mpe-two-test-sets", margin=0.0)

    def register(md5, test_set, r1, remeasure=None):
        return register_and_gate(
            settings, cfg, logged_model, _metrics(r1), {"dvc.model": md5, "test_set_sha256": test_set}, remeasure
        )

    assert register("m1", "set-A", 0.9)["alias"] == "champion"
    asked = []

    def remeasure(uri):
        asked.append(uri)
        return _metrics(0.3)  # the champion, on the new test set

    second = register("m2", "set-B", 0.5, remeasure)
    assert asked == ["models:/mpe-two-test-sets@champion"]
    assert second["champion_score"] == gate_score(_metrics(0.3), "mean_recall") and second["alias"] == "champion"
    third = register("m3", "set-C", 0.99)  # no way to re-measure the champion (version 2, set B) on set C
    assert third["alias"] == "challenger" and not third["promoted"] and "another test set" in third["reason"]
    fourth = register("m4", "set-B", 0.6)  # the champion's own test set: its stored score is compared
    assert fourth["champion_score"] == pytest.approx(0.5, abs=1e-6) and fourth["alias"] == "champion"


# --- a project that already ran, pointed at a new tracking store


def _mpe(params: Path, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "mpe"), "--params", str(params), *args],
        cwd=params.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_project_pointed_at_a_new_tracking_server_logs_its_finished_training_there(
    project, tracking_server, tmp_path
):
    """The finished training's checkpoint names a run of the project's first store (sqlite): pointed at the
    tracking server, train resumes the finished run and logs it there as a new run (its steps included), and
    evaluate and register follow in the new store."""
    import mlflow

    from tests.project_config import copy_project

    params = copy_project(project, tmp_path, train={"max_steps": 4, "log_every": 1})
    first = _mpe(params, "train")
    assert first.returncode == 0, first.stderr[-3000:]
    old_run = json.loads((tmp_path / "metrics" / "train.json").read_text())["mlflow_run_id"]
    uri = tracking_server["uri"]
    again = _mpe(params, "--tracking-uri", uri, "train")
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert summary["restored_from_step"] == summary["steps"] == 4  # resumed, nothing trained twice
    client = mlflow.MlflowClient(uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert summary["mlflow_run_id"] != old_run and run.data.tags["mpe.previous_run_id"] == old_run
    history = json.loads((tmp_path / "metrics" / "train_history.json").read_text())
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert logged == {row["step"]: pytest.approx(row["loss"]) for row in history}
    for stage in ("evaluate", "register"):
        out = _mpe(params, "--tracking-uri", uri, "--set", "register.model_name=mpe-new-store", stage)
        assert out.returncode == 0, (stage, out.stderr[-3000:])
    registered = json.loads((tmp_path / "metrics" / "register.json").read_text())
    assert registered["version"] == "1" and registered["alias"] == "champion"
    assert client.get_model_version("mpe-new-store", "1").tags["mlflow_train_run_id"] == run.info.run_id


# --- the server's own faults (last in this module: they kill the session's server, and restart it)


def _cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mpe.cli", "tracking-server", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _gone(pid: int, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_a_killed_mlflow_server_is_reported_its_workers_stopped_and_start_restarts_it(tracking_server):
    lay = Layout(tracking_server["dir"])
    state = json.loads(lay.state.read_text())
    port = str(state["port"])
    os.kill(state["pid"], signal.SIGKILL)  # the MLflow server process alone: its uvicorn workers live on
    assert _gone(state["pid"])
    out = _cli("status", "--dir", str(lay.root))
    report = json.loads(out.stdout)
    workers = [p["pid"] for p in report["processes"] if p["role"] == "mlflow worker"]
    assert out.returncode == 1 and not report["healthy"] and workers, out.stdout + out.stderr
    assert f"the MLflow server (pid {state['pid']}) is gone" in out.stderr and len(out.stderr.splitlines()) == 1
    out = _cli("start", "--dir", str(lay.root), "--port", port, "--workers", "1")
    assert out.returncode == 0 and "restarted" in out.stdout, out.stdout + out.stderr
    assert all(_gone(pid, 1) for pid in workers)  # the orphaned workers were stopped, not left serving
    report = json.loads(_cli("status", "--dir", str(lay.root)).stdout)
    assert report["healthy"] and report["pid"] != state["pid"] and report["port"] == state["port"]
    import mlflow

    assert mlflow.MlflowClient(tracking_server["uri"]).search_experiments()  # it answers, from PostgreSQL


def test_a_killed_postgresql_is_reported_a_client_fails_fast_and_start_restarts_it(tracking_server, tmp_path):
    lay = Layout(tracking_server["dir"])
    postmaster = int((lay.pgdata / "postmaster.pid").read_text().split()[0])
    os.kill(postmaster, signal.SIGKILL)
    assert _gone(postmaster)
    out = _cli("status", "--dir", str(lay.root))
    assert out.returncode == 1 and "PostgreSQL is not running" in out.stderr, out.stdout + out.stderr
    compare = [sys.executable, "-m", "mpe.cli", "compare", "--tracking-uri", tracking_server["uri"]]
    compare += ["--out", str(tmp_path / "compare.md")]
    client = subprocess.run(compare, cwd=REPO, capture_output=True, text=True, timeout=180)  # it hung before
    assert client.returncode == 2 and "Traceback" not in client.stderr, client.stderr[-3000:]
    assert tracking_server["uri"] in client.stderr and len(client.stderr.strip().splitlines()) == 1
    port = tracking_server["uri"].rsplit(":", 1)[1]
    out = _cli("start", "--dir", str(lay.root), "--port", port, "--workers", "1")
    assert out.returncode == 0 and "restarted" in out.stdout, out.stdout + out.stderr
    assert json.loads(_cli("status", "--dir", str(lay.root)).stdout)["healthy"]
    client = subprocess.run(compare, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert client.returncode == 0, client.stderr[-3000:]
