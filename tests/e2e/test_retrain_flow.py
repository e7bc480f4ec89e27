"""The lifecycle end to end on a small project: a Prefect server on 127.0.0.1 (started and stopped
here), the nightly deployment from prefect.yaml run by a process worker, the retrain flow through
DVC, push to a local DVC remote, MLflow registration with lineage and the promotion gate, loading
the champion in a fresh process, and a fresh clone + ``dvc pull`` restoring the outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.e2e.project import BIN, free_port as _free_port, git, make_project, pipeline_params, run

pytestmark = pytest.mark.slow


def _run(cmd, cwd, env, timeout=600):
    return run(cmd, cwd, env, timeout)


def _git(cwd, *args):
    git(cwd, *args)


def _params(base: Path, **train) -> dict:
    return pipeline_params(base, **train)


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    log = open(home / "server.log", "w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                os.killpg(server.pid, signal.SIGKILL)
                pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(1)
    env["PREFECT_API_URL"] = url
    old = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        yield env
    finally:
        if old is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = old
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_base_dir, prefect_env):
    root = tmp_path_factory.mktemp("e2e")
    return make_project(root / "proj", _params(tiny_base_dir, lr=1e-9, max_steps=4))  # A: weak


@pytest.fixture(scope="module")
def snapshots():
    """The outputs' bytes right after each registered version: {version: {path: sha256}}."""
    return {}


OUTPUTS = ("data", "cache", "models/base", "models/trained")


def _snapshot(root: Path) -> dict[str, str]:
    from mpe.hashing import file_sha256

    return {str(p.relative_to(root)): file_sha256(p) for d in OUTPUTS for p in sorted((root / d).rglob("*"))
            if p.is_file()}


def _flow_run_state(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client

    import anyio

    async def read():
        async with get_client() as client:
            return (await client.read_flow_run(flow_run_id)).state.type.value

    return anyio.run(read)


def _registry(proj):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlruns.db'}")
    return mlflow.MlflowClient()


def test_1_nightly_deployment_exists_with_cron_and_a_run_from_it_completes(project, prefect_env, snapshots):
    proj, _ = project
    env = {**prefect_env, "PWD": str(proj)}
    _run([str(BIN / "mpe"), "work-pool", "--name", "local-process"], proj, env)
    _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], proj, env)
    info = _run([str(BIN / "prefect"), "deployment", "inspect", "retrain/nightly"], proj, env)
    assert "0 2 * * *" in info and "local-process" in info
    assert "ENQUEUE" in info and "concurrency" in info, info  # one run of the deployment at a time, queued
    out = _run([str(BIN / "prefect"), "deployment", "run", "retrain/nightly"], proj, env)
    run_id = next(line.split()[-1] for line in out.splitlines() if "UUID" in line)
    _run([str(BIN / "prefect"), "worker", "start", "--pool", "local-process", "--type", "process", "--run-once"],
         proj, env, timeout=900)
    deadline = time.monotonic() + 600
    while _flow_run_state(run_id) not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") and time.monotonic() < deadline:
        time.sleep(2)
    assert _flow_run_state(run_id) == "COMPLETED"
    for out_dir in ("data", "models/base", "cache", "models/trained", "plots"):
        assert (proj / out_dir).exists(), out_dir
    reg = json.loads((proj / "metrics" / "register.json").read_text())
    assert reg["version"] == "1" and reg["alias"] == "champion"
    tags = _registry(proj).get_model_version("mpe-e2e", "1").tags
    assert tags["prefect_flow_run_id"] == run_id
    snapshots["1"] = _snapshot(proj)


def _flow(proj, params):
    from flows.retrain import retrain

    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    cwd = os.getcwd()
    try:
        return retrain(params_path="params.yaml", project_dir=str(proj))
    finally:
        os.chdir(cwd)


def test_2_a_better_model_is_promoted_with_lineage(project, tiny_base_dir, snapshots):
    proj, _ = project
    cache_summary = (proj / "metrics" / "cache.json").stat().st_mtime
    result = _flow(proj, _params(tiny_base_dir))
    assert result["alias"] == "champion" and result["version"] == "2", result
    assert result["score"] > result["champion_score"]
    # only train and evaluate depended on the change: data, base model and cache were skipped
    assert (proj / "metrics" / "cache.json").stat().st_mtime == cache_summary
    client = _registry(proj)
    tags = client.get_model_version("mpe-e2e", "2").tags
    lock = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
    out = {o["path"]: o["md5"] for stage in lock.values() for o in stage["outs"]}
    assert tags["dvc.model"] == out["models/trained"] and tags["dvc.model"].endswith(".dir")
    assert tags["dvc.data"] == out["data"] and tags["dvc.cache"] == out["cache"]
    assert len(tags["git_commit"].split("-")[0]) == 40
    assert tags["base_model"] == str(tiny_base_dir) and tags["ray_run_name"].startswith("mpe-default-")
    assert tags["prefect_flow_run_id"] and tags["mlflow_train_run_id"]
    assert str(client.get_model_version_by_alias("mpe-e2e", "champion").version) == "2"
    # the outputs' record: a commit on mpe/runs whose dvc.lock holds this model's hash; the user's branch untouched
    assert tags["mpe.run_ref"] == "mpe/runs" and tags["git_commit"].split("-")[0] != tags["mpe.run_commit"]
    recorded = subprocess.run(["git", "show", f"{tags['mpe.run_commit']}:dvc.lock"], cwd=proj, capture_output=True,
                              text=True, check=True).stdout
    assert tags["dvc.model"] in recorded
    branch = subprocess.run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=proj, capture_output=True,
                            text=True).stdout.strip()
    assert branch != "mpe/runs"
    assert {a.path for a in client.list_artifacts(tags["mlflow_train_run_id"], "lineage")} >= {
        "lineage/dvc.lock", "lineage/params.yaml"}
    snapshots["2"] = _snapshot(proj)


def test_3_a_worse_model_is_refused_and_kept_as_challenger(project, tiny_base_dir):
    proj, _ = project
    result = _flow(proj, _params(tiny_base_dir, lr=2e-9, max_steps=4))
    assert result["alias"] == "challenger" and not result["promoted"], result
    assert "does not beat" in result["reason"]
    client = _registry(proj)
    assert str(client.get_model_version_by_alias("mpe-e2e", "champion").version) == "2"
    assert str(client.get_model_version_by_alias("mpe-e2e", "challenger").version) == "3"
    from mpe.dvc_runner import status_clean

    clean, text = status_clean(proj)
    assert clean, text


def test_3b_a_rerun_with_nothing_changed_skips_every_stage_and_the_registry(project, tiny_base_dir):
    proj, _ = project
    before = (proj / "models" / "trained" / "mpe_config.json").stat().st_mtime
    result = _flow(proj, _params(tiny_base_dir, lr=2e-9, max_steps=4))
    assert result["skipped"] and result["version"] == "3" and result["alias"] == "challenger", result
    assert (proj / "models" / "trained" / "mpe_config.json").stat().st_mtime == before


def test_3c_editing_evaluation_code_reruns_evaluate_alone(project, prefect_env):
    """DVC deps are the code each stage imports: an edit to the plots or the metrics touches evaluate
    only, and the cache (persist: true) is neither recomputed nor deleted."""
    proj, _ = project
    files = {p: p.stat().st_mtime_ns for d in ("cache", "models") for p in (proj / d).rglob("*") if p.is_file()}
    for name in ("plots.py", "evaluation.py"):
        code = proj / "mpe" / name
        code.write_text(code.read_text() + "\n# an edit to evaluation code alone\n")
    out = _run([sys.executable, "-m", "dvc", "repro"], proj, prefect_env)
    assert "Running stage 'evaluate'" in out, out
    for stage in ("data", "base_model", "cache", "train"):
        assert f"Stage '{stage}' didn't change, skipping" in out, out
    assert {p: p.stat().st_mtime_ns for p in files} == files


def test_4_compare_tables_the_runs(project):
    from mpe.compare import write_comparison
    from mpe.config import load_params
    from mpe.tracking_settings import tracking_settings

    proj, _ = project
    params = load_params(proj / "params.yaml")
    cwd = os.getcwd()
    os.chdir(proj)
    try:
        table = write_comparison(tracking_settings(params.mlflow), proj / "metrics" / "compare.md", last=5)
    finally:
        os.chdir(cwd)
    lines = table.strip().splitlines()
    assert "train.lr" in lines[0] and "t→i R@1" in lines[0] and "negation" in lines[0]
    assert len(lines) == 2 + 3  # header, rule, three runs
    assert {"2e-09", "0.002", "1e-09"} <= {c.strip() for line in lines[2:] for c in line.split("|")}


def test_5_champion_loads_in_a_fresh_process_and_embeds(project):
    proj, _ = project
    code = """
import base64, io, sys, mlflow, pandas as pd
from PIL import Image
mlflow.set_tracking_uri(sys.argv[1])
m = mlflow.pyfunc.load_model("models:/mpe-e2e@champion")
buf = io.BytesIO(); Image.new("RGB", (40, 40), (200, 20, 20)).save(buf, format="PNG")
out = m.predict(pd.DataFrame({"text": ["a red circle", None], "image": [None, base64.b64encode(buf.getvalue()).decode()]}))
import numpy as np
print(out.shape, np.round(np.linalg.norm(out, axis=1), 4).tolist())
"""
    out = _run([sys.executable, "-c", code, f"sqlite:///{proj / 'mlruns.db'}"], proj, os.environ.copy())
    assert "(2, 64) [1.0, 1.0]" in out


def _clone(proj: Path, dest: Path) -> Path:
    _git(dest.parent, "clone", "-q", str(proj), str(dest))
    return dest


def _reproduce(clone: Path, proj: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mpe"), "reproduce", "--model", "mpe-e2e", "--tracking-uri",
                           f"sqlite:///{proj / 'mlruns.db'}", *args], cwd=clone, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})


def test_6_a_fresh_clone_reproduces_version_1_not_the_latest(project, tmp_path, snapshots):
    proj, _ = project
    assert snapshots["1"] != _snapshot(proj)  # later runs changed the workspace
    clone = _clone(proj, tmp_path / "clone")
    out = _reproduce(clone, proj, "--version", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert _snapshot(clone) == snapshots["1"]  # data, cache, base and trained model, byte for byte
    code = """
import sys, mlflow, pandas as pd, numpy as np
from mpe.model import MultiPromptCLIP
mlflow.set_tracking_uri(sys.argv[1])
registered = mlflow.pyfunc.load_model("models:/mpe-e2e/1").predict(pd.DataFrame({"text": ["a red circle"]}))
restored = MultiPromptCLIP.from_pretrained(sys.argv[2]).encode_text(["a red circle"]).detach().numpy()
print(float(np.abs(registered - restored).max()))
"""
    diff = _run([sys.executable, "-c", code, f"sqlite:///{proj / 'mlruns.db'}", str(clone / "models" / "trained")],
                clone, os.environ.copy())
    assert float(diff.strip().splitlines()[-1]) < 1e-5


def test_7_a_serving_host_pulls_the_model_alone(project, tmp_path, snapshots):
    proj, _ = project
    clone = _clone(proj, tmp_path / "serving")
    out = _reproduce(clone, proj, "--alias", "champion", "--only", "model")
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (clone / "data").exists() and not (clone / "cache").exists()
    want = {k: v for k, v in snapshots["2"].items() if k.startswith("models/trained/")}
    assert {k: v for k, v in _snapshot(clone).items() if k.startswith("models/trained/")} == want


def test_7b_outside_git_the_mlflow_artifacts_are_the_record(project, tmp_path, snapshots):
    proj, remote = project
    plain = tmp_path / "plain"  # a folder that never saw git: DVC alone, pointed at the same remote
    plain.mkdir()
    for cmd in (["init", "--no-scm", "-q"], ["remote", "add", "-d", "localremote", str(remote)]):
        _run([sys.executable, "-m", "dvc", *cmd], plain, {**os.environ, "DVC_NO_ANALYTICS": "1"})
    out = _reproduce(plain, proj, "--version", "1", "--only", "model")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "the MLflow artifacts of run" in out.stdout
    want = {k: v for k, v in snapshots["1"].items() if k.startswith("models/trained/")}
    assert {k: v for k, v in _snapshot(plain).items() if k.startswith("models/trained/")} == want
    assert (plain / "dvc.lock").exists() and (plain / "params.yaml").exists()


def test_8_a_missing_remote_object_names_the_version_path_and_remote(project, tmp_path):
    proj, remote = project
    client = _registry(proj)
    md5 = client.get_model_version("mpe-e2e", "1").tags["dvc.model"].removesuffix(".dir")
    victim = next(remote.rglob(f"{md5[2:]}.dir"))
    victim.unlink()
    clone = _clone(proj, tmp_path / "broken")
    out = _reproduce(clone, proj, "--version", "1", "--only", "model")
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "version 1" in out.stderr and "models/trained" in out.stderr and "localremote" in out.stderr
    out = _reproduce(clone, proj, "--version", "99")
    assert out.returncode == 2 and "no version 99" in out.stderr
