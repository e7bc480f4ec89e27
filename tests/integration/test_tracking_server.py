"""The project-local tracking server (``mpe tracking-server``) on a real PostgreSQL: loopback only, MLflow
connects as an unprivileged role with the generated password, which no log, URI or command line holds,
and a second start reuses the running server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
import subprocess
import sys
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
