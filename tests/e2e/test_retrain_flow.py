"""The lifecycle end to end on a small project: a Prefect server on 127.0.0.1 (started and stopped
here), the nightly deployment from prefect.yaml run by a process worker, the retrain flow through
DVC, push to a local DVC remote, MLflow registration with lineage and the promotion gate on the shared
tracking server (``mpe tracking-server``: MLflow on PostgreSQL, artifacts served by it), two registrations
at once through the gate, loading the champion in a fresh process, and a fresh clone + ``dvc pull``
restoring the outputs."""

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

from tests.e2e.project import BIN, REPO, git, make_project, pipeline_params, run
from tests.e2e.project import free_port as _free_port

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
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "true",  # test_10 looks at it in a browser
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",  # else the page asks the default port
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    log = open(home / "server.log", "w")
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
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
def tracking_uri(tracking_server):
    return tracking_server["uri"]


def _params_on_server(base: Path, uri: str, **train) -> dict:
    params = _params(base, **train)
    params["mlflow"].update(tracking_uri=uri, experiment="mpe-e2e")  # artifact_root stays local: unused with a server
    return params


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_base_dir, prefect_env, tracking_uri):
    root = tmp_path_factory.mktemp("e2e")
    return make_project(root / "proj", _params_on_server(tiny_base_dir, tracking_uri, lr=1e-9, max_steps=4))  # A: weak


@pytest.fixture(scope="module")
def snapshots():
    """The outputs' bytes right after each registered version: {version: {path: sha256}}."""
    return {}


OUTPUTS = ("data", "cache", "models/base", "models/trained")


def _snapshot(root: Path) -> dict[str, str]:
    from mpe.files.hashing import file_sha256
    from mpe.files.verified import RECORD  # this machine's verification record: not data, not in DVC

    # the model card is written by evaluate and kept out of the model's DVC hash (.dvcignore): not an output
    return {
        str(p.relative_to(root)): file_sha256(p)
        for d in OUTPUTS
        for p in sorted((root / d).rglob("*"))
        if p.is_file() and p.name != RECORD and p.relative_to(root).as_posix() != "models/trained/README.md"
    }


def _flow_run_state(api_url: str, flow_run_id: str) -> str:
    """The flow run's state, asked of the test's Prefect server over its REST API (an in-process Prefect client
    keeps the settings of the first test that imported Prefect in this worker, whatever PREFECT_API_URL is now)."""
    import httpx

    return httpx.get(f"{api_url}/flow_runs/{flow_run_id}", timeout=30).raise_for_status().json()["state"]["type"]


def _registry(uri: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient()


def test_1_nightly_deployment_exists_with_cron_and_a_run_from_it_completes(
    project, tracking_uri, prefect_env, snapshots
):
    proj, _ = project
    env = {**prefect_env, "PWD": str(proj)}
    _run([str(BIN / "mpe"), "work-pool", "--name", "local-process"], proj, env)
    _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], proj, env)
    info = _run([str(BIN / "prefect"), "deployment", "inspect", "retrain/nightly"], proj, env)
    assert "0 2 * * *" in info and "local-process" in info
    assert "ENQUEUE" in info and "concurrency" in info, info  # one run of the deployment at a time, queued
    out = _run([str(BIN / "prefect"), "deployment", "run", "retrain/nightly"], proj, env)
    run_id = next(line.split()[-1] for line in out.splitlines() if "UUID" in line)
    _run(
        [str(BIN / "prefect"), "worker", "start", "--pool", "local-process", "--type", "process", "--run-once"],
        proj,
        env,
        timeout=900,
    )
    deadline = time.monotonic() + 600
    while (
        _flow_run_state(env["PREFECT_API_URL"], run_id) not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
        and time.monotonic() < deadline
    ):
        time.sleep(2)
    assert _flow_run_state(env["PREFECT_API_URL"], run_id) == "COMPLETED"
    for out_dir in ("data", "models/base", "cache", "models/trained", "plots"):
        assert (proj / out_dir).exists(), out_dir
    reg = json.loads((proj / "metrics" / "register.json").read_text())
    assert reg["version"] == "1" and reg["alias"] == "champion"
    tags = _registry(tracking_uri).get_model_version("mpe-e2e", "1").tags
    assert tags["prefect_flow_run_id"] == run_id
    snapshots["1"] = _snapshot(proj)


def _flow(proj, params):
    from mpe.runtime.prefect_server import load_flow

    retrain = load_flow(proj, "retrain.py:retrain")  # the project's own flow file, by path
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    cwd = os.getcwd()
    try:
        return retrain(params_path="params.yaml", project_dir=str(proj))
    finally:
        os.chdir(cwd)


def test_2_a_better_model_is_promoted_with_lineage(project, tracking_uri, tracking_server, tiny_base_dir, snapshots):
    proj, _ = project
    cache_summary = (proj / "metrics" / "cache.json").stat().st_mtime
    result = _flow(proj, _params_on_server(tiny_base_dir, tracking_uri))
    assert result["alias"] == "champion" and result["version"] == "2", result
    assert result["score"] > result["champion_score"]
    # only train and evaluate depended on the change: data, base model and cache were skipped
    assert (proj / "metrics" / "cache.json").stat().st_mtime == cache_summary
    client = _registry(tracking_uri)
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
    recorded = subprocess.run(
        ["git", "show", f"{tags['mpe.run_commit']}:dvc.lock"], cwd=proj, capture_output=True, text=True, check=True
    ).stdout
    assert tags["dvc.model"] in recorded
    branch = subprocess.run(
        ["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=proj, capture_output=True, text=True
    ).stdout.strip()
    assert branch != "mpe/runs"
    assert {a.path for a in client.list_artifacts(tags["mlflow_train_run_id"], "lineage")} >= {
        "lineage/dvc.lock",
        "lineage/params.yaml",
    }
    # everything went to the tracking server: the run's metrics in PostgreSQL, the files in its artifact folder
    trained = json.loads((proj / "metrics" / "eval.json").read_text())["trained"]
    logged = client.get_run(tags["mlflow_train_run_id"]).data.metrics
    assert {k: logged[f"eval.{k}".replace("@", "_at_")] for k in trained} == pytest.approx(trained)
    assert not (proj / "mlruns.db").exists() and not (proj / "mlartifacts").exists()
    served = tracking_server["dir"] / "artifacts"
    assert list(served.rglob("dvc.lock")) and list(served.rglob("MLmodel"))
    snapshots["2"] = _snapshot(proj)
    _model_card_is_written_and_logged_with_the_model(proj, client, trained, tiny_base_dir.name)
    _search_index_is_built_and_versioned_with_the_model(proj, client)


def _model_card_is_written_and_logged_with_the_model(proj: Path, client, trained: dict, base: str) -> None:
    """models/trained/README.md: Hugging Face front matter whose metrics are eval.json's, beside MLmodel in the
    registered model; and outside the train stage's DVC hash (dvc status stays clean: test_3)."""
    import mlflow

    card = (proj / "models" / "trained" / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "mpe" and meta["base_model"] == base  # a local folder: its name, not its path
    assert meta["datasets"] == ["mpe-shapes (synthetic)"]
    logged = {
        m["type"]: m["value"]
        for result in meta["model-index"][0]["results"]
        for m in result["metrics"]
        if result["dataset"]["type"] == "test"
    }
    assert logged == {k: round(v, 4) for k, v in trained.items()}
    assert meta["model-index"][0]["name"] == "mpe-e2e"
    assert "## Intended use" in card and "adaptive prompts" in card
    downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/mpe-e2e/2"))
    assert (downloaded / "README.md").read_text() == card
    assert (downloaded / "MLmodel").is_file()


def _search_index_is_built_and_versioned_with_the_model(proj: Path, client) -> None:
    from mpe.serving.image_index import model_sha256, read_meta

    meta = read_meta(proj / "models" / "index")
    assert meta["model"]["sha256"] == model_sha256(proj / "models" / "trained")
    assert meta["model"]["source"] == "models:/mpe-e2e/2" and meta["index_key"] == "Flat"
    uri = client.get_model_version("mpe-e2e", "2").tags["mpe.search_index"]
    run_id = client.get_model_version("mpe-e2e", "2").run_id
    assert uri == f"runs:/{run_id}/search_index"
    assert {a.path for a in client.list_artifacts(run_id, "search_index")} >= {
        "search_index/index.json",
        "search_index/index.faiss",
        "search_index/items.parquet",
        "search_index/embeddings.npy",
    }


def test_3_a_worse_model_is_refused_and_kept_as_challenger(project, tracking_uri, tiny_base_dir):
    proj, _ = project
    result = _flow(proj, _params_on_server(tiny_base_dir, tracking_uri, lr=2e-9, max_steps=4))
    assert result["alias"] == "challenger" and not result["promoted"], result
    assert "does not beat" in result["reason"]
    client = _registry(tracking_uri)
    assert str(client.get_model_version_by_alias("mpe-e2e", "champion").version) == "2"
    assert str(client.get_model_version_by_alias("mpe-e2e", "challenger").version) == "3"
    from tests.e2e.project import status_clean

    clean, text = status_clean(proj)
    assert clean, text


def test_3b_a_rerun_with_nothing_changed_skips_every_stage_and_the_registry(project, tracking_uri, tiny_base_dir):
    proj, _ = project
    before = (proj / "models" / "trained" / "mpe_config.json").stat().st_mtime
    result = _flow(proj, _params_on_server(tiny_base_dir, tracking_uri, lr=2e-9, max_steps=4))
    assert result["skipped"] and result["version"] == "3" and result["alias"] == "challenger", result
    assert (proj / "models" / "trained" / "mpe_config.json").stat().st_mtime == before


def test_3bb_two_registrations_at_once_gate_one_after_the_other(project, tracking_uri, tmp_path):
    """Two processes register two trained models (this flow's versions 2 and 1) at the same moment under a
    new name: distinct versions, every tag kept, and the gate decides as if they had come one after the
    other in version order (without serialisation both read "no champion" and both promote)."""
    from mpe.tracking.gate import decide

    client = _registry(tracking_uri)
    jobs = []
    for i, source in enumerate(("2", "1")):
        mv = client.get_model_version("mpe-e2e", source)
        job = {
            "tracking_uri": tracking_uri,
            "experiment": "mpe-e2e",
            "model_name": "mpe-e2e-race",
            "model_uri": mv.source,
            "metrics": json.loads(mv.tags["eval.metrics"]),
            "lineage": {k: v for k, v in mv.tags.items() if not k.startswith(("eval.", "gate."))},
            "ready": str(tmp_path / f"ready{i}"),
            "go": str(tmp_path / "go"),
            "out": str(tmp_path / f"out{i}.json"),
        }
        (tmp_path / f"job{i}.json").write_text(json.dumps(job))
        jobs.append(job)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.registrant", str(tmp_path / f"job{i}.json")],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 120
        while not all(Path(j["ready"]).exists() for j in jobs):  # both imported and connected: start together
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.poll() for p in procs]
            time.sleep(0.05)
        (tmp_path / "go").touch()
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    results = [json.loads(Path(j["out"]).read_text()) for j in jobs]
    assert sorted(r["version"] for r in results) == ["1", "2"]
    versions = sorted(client.search_model_versions("name = 'mpe-e2e-race'"), key=lambda v: int(v.version))
    assert [v.version for v in versions] == ["1", "2"]
    by_source = {j["model_uri"]: j for j in jobs}
    champion, champion_score = None, None
    for v in versions:  # the reference: the gate run one registration after the other, in version order
        job = by_source[v.source]
        assert {k: v.tags[k] for k in job["lineage"]} == job["lineage"]
        assert json.loads(v.tags["eval.metrics"]) == job["metrics"] and v.tags["gate.state"] == "decided"
        score = float(v.tags["eval.mean_recall"])
        promote, reason = decide(score, champion_score, 0.0)
        assert v.tags["gate.decision"] == reason, (v.version, v.tags["gate.decision"], reason)
        if promote:
            champion, champion_score = v.version, score
    assert str(client.get_model_version_by_alias("mpe-e2e-race", "champion").version) == champion
    assert sum("champion" in client.get_model_version("mpe-e2e-race", v.version).aliases for v in versions) == 1
    second = next(r for r in results if r["version"] == "2")
    assert second["champion_score"] is not None and second["previous_champion_version"] == "1"


def test_3c_editing_evaluation_code_reruns_evaluate_alone(project, prefect_env):
    """DVC deps are the code each stage imports: an edit to the plots or the metrics touches evaluate
    only, and the cache (persist: true) is neither recomputed nor deleted."""
    proj, _ = project
    card = proj / "models" / "trained" / "README.md"  # evaluate writes the model card: it alone may change
    files = {
        p: p.stat().st_mtime_ns for d in ("cache", "models") for p in (proj / d).rglob("*") if p.is_file() and p != card
    }
    for name in ("plots.py", "tasks.py"):
        code = proj / "mpe" / "evaluation" / name
        code.write_text(code.read_text() + "\n# an edit to evaluation code alone\n")
    out = _run([sys.executable, "-m", "dvc", "repro"], proj, prefect_env)
    assert "Running stage 'evaluate'" in out, out
    for stage in ("data", "base_model", "cache", "train"):
        assert f"Stage '{stage}' didn't change, skipping" in out, out
    assert {p: p.stat().st_mtime_ns for p in files} == files
    assert card.stat().st_mtime_ns > max(files.values())


def test_4_compare_tables_the_runs(project):
    from mpe.config import load_params
    from mpe.tracking.compare import write_comparison
    from mpe.tracking.settings import tracking_settings

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


def test_5_champion_loads_in_a_fresh_process_and_embeds(project, tracking_uri):
    proj, _ = project
    code = """
import base64, io, sys, mlflow, pandas as pd
from PIL import Image
mlflow.set_tracking_uri(sys.argv[1])
m = mlflow.pyfunc.load_model("models:/mpe-e2e@champion")
buf = io.BytesIO(); Image.new("RGB", (40, 40), (200, 20, 20)).save(buf, format="PNG")
image = base64.b64encode(buf.getvalue()).decode()
out = m.predict(pd.DataFrame({"text": ["a red circle", None], "image": [None, image]}))
import numpy as np
print(out.shape, np.round(np.linalg.norm(out, axis=1), 4).tolist())
"""
    out = _run([sys.executable, "-c", code, tracking_uri], proj, os.environ.copy())
    assert "(2, 64) [1.0, 1.0]" in out


def _clone(proj: Path, dest: Path) -> Path:
    _git(dest.parent, "clone", "-q", str(proj), str(dest))
    return dest


def _reproduce(clone: Path, tracking_uri: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "mpe"), "reproduce", "--model", "mpe-e2e", "--tracking-uri", tracking_uri, *args],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
    )


def test_6_a_fresh_clone_reproduces_version_1_not_the_latest(project, tracking_uri, tmp_path, snapshots):
    proj, _ = project
    assert snapshots["1"] != _snapshot(proj)  # later runs changed the workspace
    clone = _clone(proj, tmp_path / "clone")
    out = _reproduce(clone, tracking_uri, "--version", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert _snapshot(clone) == snapshots["1"]  # data, cache, base and trained model, byte for byte
    code = """
import sys, mlflow, pandas as pd, numpy as np
from mpe.model.multi_prompt_clip import MultiPromptCLIP
mlflow.set_tracking_uri(sys.argv[1])
registered = mlflow.pyfunc.load_model("models:/mpe-e2e/1").predict(pd.DataFrame({"text": ["a red circle"]}))
restored = MultiPromptCLIP.from_pretrained(sys.argv[2]).encode_text(["a red circle"]).detach().numpy()
print(float(np.abs(registered - restored).max()))
"""
    diff = _run([sys.executable, "-c", code, tracking_uri, str(clone / "models" / "trained")], clone, os.environ.copy())
    assert float(diff.strip().splitlines()[-1]) < 1e-5


def test_7_a_serving_host_pulls_the_model_alone(project, tracking_uri, tmp_path, snapshots):
    proj, _ = project
    clone = _clone(proj, tmp_path / "serving")
    out = _reproduce(clone, tracking_uri, "--alias", "champion", "--only", "model")
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (clone / "data").exists() and not (clone / "cache").exists()
    want = {k: v for k, v in snapshots["2"].items() if k.startswith("models/trained/")}
    assert {k: v for k, v in _snapshot(clone).items() if k.startswith("models/trained/")} == want


def test_7b_outside_git_the_mlflow_artifacts_are_the_record(project, tracking_uri, tmp_path, snapshots):
    proj, remote = project
    plain = tmp_path / "plain"  # a folder that never saw git: DVC alone, pointed at the same remote
    plain.mkdir()
    for cmd in (["init", "--no-scm", "-q"], ["remote", "add", "-d", "localremote", str(remote)]):
        _run([sys.executable, "-m", "dvc", *cmd], plain, {**os.environ, "DVC_NO_ANALYTICS": "1"})
    out = _reproduce(plain, tracking_uri, "--version", "1", "--only", "model")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "the MLflow artifacts of run" in out.stdout
    want = {k: v for k, v in snapshots["1"].items() if k.startswith("models/trained/")}
    assert {k: v for k, v in _snapshot(plain).items() if k.startswith("models/trained/")} == want
    assert (plain / "dvc.lock").exists() and (plain / "params.yaml").exists()


def test_8_a_missing_remote_object_names_the_version_path_and_remote(project, tracking_uri, tmp_path):
    proj, remote = project
    client = _registry(tracking_uri)
    md5 = client.get_model_version("mpe-e2e", "1").tags["dvc.model"].removesuffix(".dir")
    victim = next(remote.rglob(f"{md5[2:]}.dir"))
    weights = next(e["md5"] for e in json.loads(victim.read_text()) if e["relpath"] == "mpe_weights.safetensors")
    inside = remote / "files" / "md5" / weights[:2] / weights[2:]
    kept = inside.read_bytes()
    inside.unlink()  # one file of the model folder: named by its path in the folder and in the remote
    clone = _clone(proj, tmp_path / "broken")
    out = _reproduce(clone, tracking_uri, "--version", "1", "--only", "model")
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "version 1" in last and f"'localremote' ({remote})" in last, last
    assert "models/trained/mpe_weights.safetensors" in last and str(inside) in last, last
    inside.write_bytes(kept)
    victim.unlink()
    out = _reproduce(clone, tracking_uri, "--version", "1", "--only", "model")
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "version 1" in out.stderr and "models/trained" in out.stderr and "localremote" in out.stderr
    out = _reproduce(clone, tracking_uri, "--version", "99")
    assert out.returncode == 2 and "no version 99" in out.stderr


def _champion_reference(tracking_uri: str, proj: Path, query_count: int = 12):
    """Independent of the index: the champion's own embeddings of every indexed image (decoded from the
    shards here) and a test caption whose best image leads the runner-up clearly (float16 storage cannot
    swap them). Returns (query, split/key of the best image)."""
    import tarfile

    import mlflow
    import numpy as np
    import torch
    from PIL import Image

    from mpe.model.multi_prompt_clip import MultiPromptCLIP
    from mpe.serving.mlflow_model import download_model_folder

    mlflow.set_tracking_uri(tracking_uri)
    model = MultiPromptCLIP.from_pretrained(download_model_folder("models:/mpe-e2e@champion")).eval()
    keys, images, captions = [], [], []
    for split in ("train", "test"):
        for shard in sorted((proj / "data" / "shards" / split).glob("*.tar")):
            with tarfile.open(shard) as tar:
                for m in tar.getmembers():
                    key, _, ext = m.name.partition(".")
                    if ext == "jpg":
                        keys.append(f"{split}/{key}")
                        images.append(Image.open(tar.extractfile(m)).convert("RGB"))
                    elif ext == "txt" and split == "test":
                        captions.append(tar.extractfile(m).read().decode())
    with torch.no_grad():
        emb = model.encode_image(images).float().numpy()
        queries = sorted(set(captions))[:query_count]
        texts = model.encode_text(queries).float().numpy()
    scores = texts @ emb.T
    top2 = np.sort(scores, axis=1)[:, -2:]
    best = int(np.argmax(top2[:, 1] - top2[:, 0]))
    assert top2[best, 1] - top2[best, 0] > 0.005, "no query separates its best image from the next"
    return queries[best], keys[int(np.argmax(scores[best]))]


def test_9_serving_the_champion_searches_its_own_index(project, tracking_uri):
    """`mpe serve` on the champion finds the search index logged with that version (its tag), not the newer
    one in models/index, and ranks as the champion itself does. (The page in a browser:
    tests/integration/test_search.py.)"""
    from tests.server_process import running

    proj, _ = project
    query, expected = _champion_reference(tracking_uri, proj)
    serve = [str(BIN / "mpe"), "serve", "--model", "models:/mpe-e2e@champion", "--tracking-uri", tracking_uri]
    with running(serve, proj) as client:
        body = client.get("/search", params={"q": query, "k": 5}).json()
        first = body["results"][0]
        assert f"{first['split']}/{first['key']}" == expected
        assert body["model"]["source"] == "models:/mpe-e2e/2"  # the champion's index (models/index is version 3's)
        assert client.get(first["image"]).status_code == 200


def test_10_the_mlflow_run_page_and_the_prefect_ui_show_the_run(project, tracking_uri, prefect_env, tmp_path):
    """The tracking server's UI shows the champion's training run with its metrics, and the Prefect UI the
    retrain flow's runs, in a real browser; both screenshots are the docs'."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.browser import chromium, screenshot

    client = _registry(tracking_uri)
    run_id = client.get_model_version_by_alias("mpe-e2e", "champion").run_id
    run = client.get_run(run_id)
    with chromium(tmp_path / "chromium") as page:
        wait = WebDriverWait(page, 90)
        page.get(f"{tracking_uri}/#/experiments/{run.info.experiment_id}/runs/{run_id}")
        wait.until(lambda d: run.info.run_name in d.find_element(By.TAG_NAME, "body").text)
        wait.until(lambda d: "Metrics" in d.find_element(By.TAG_NAME, "body").text)
        screenshot(page, tmp_path, "mlflow-run.png")
        prefect = prefect_env["PREFECT_API_URL"].removesuffix("/api")
        page.get(f"{prefect}/runs")
        wait.until(lambda d: "retrain" in d.find_element(By.TAG_NAME, "body").text)
        wait.until(lambda d: "Completed" in d.find_element(By.TAG_NAME, "body").text)
        screenshot(page, tmp_path, "prefect-ui.png")


def test_11_dvc_exp_run_sets_a_param_and_exp_show_lists_the_metrics(project, prefect_env):
    """`dvc exp run -S` on the pipeline as DVC users run it: only what the param touches reruns, and
    `dvc exp show` lists the experiment with its params and the metrics of dvc.yaml."""
    proj, _ = project
    out = _run(
        [sys.executable, "-m", "dvc", "exp", "run", "-S", "train.epochs=1", "-n", "one-epoch"], proj, prefect_env
    )
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out, out[-3000:]
    for stage in ("data", "base_model", "cache"):
        assert f"Stage '{stage}' didn't change, skipping" in out, out[-3000:]
    assert yaml.safe_load((proj / "params.yaml").read_text())["train"]["epochs"] == 1  # applied to the workspace
    shown = json.loads(_run([sys.executable, "-m", "dvc", "exp", "show", "--json"], proj, prefect_env))
    experiments = [e for node in shown for e in (node.get("experiments") or []) for e in (e.get("revs") or [e])]
    exp = next(e for e in experiments if e.get("name") == "one-epoch")
    params = exp["data"]["params"]["params.yaml"]["data"]
    metrics = exp["data"]["metrics"]
    assert params["train"]["epochs"] == 1
    evaluation = metrics["metrics/eval.json"]["data"]["trained"]
    assert evaluation == json.loads((proj / "metrics" / "eval.json").read_text())["trained"]
    assert metrics["metrics/train.json"]["data"]["steps"] > 0
    table = _run([sys.executable, "-m", "dvc", "exp", "show", "--no-pager", "--md"], proj, prefect_env)
    assert "one-epoch" in table and "text_to_image_R@1" in table
