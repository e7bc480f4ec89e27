"""Shared fixtures: the bundled tokenizer and tiny random decoders of every supported architecture."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from mpe.runtime.telemetry import disable_telemetry  # noqa: E402

disable_telemetry()
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # tests only start local Ray on 127.0.0.1

from tests.session_temp import claim  # noqa: E402

# Before anything asks for a temp folder: the whole run's temporary state in one folder of its own.
SESSION_TEMP, OWNS_SESSION_TEMP = claim()

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from mpe.model.base_model import resolve_base_model  # noqa: E402

ARCHS = ["llama", "gemma", "gemma2", "qwen2", "gpt2"]


@pytest.fixture(autouse=True)
def _no_inherited_tracking_uri():
    """``mlflow.set_tracking_uri`` writes ``MLFLOW_TRACKING_URI`` into this process's environment, and an ``mpe``
    command started later by another test would inherit it and track to that test's store: every test
    starts without it (a test that wants it sets it)."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


# The modules that take minutes, longest first (their time in `pytest --durations=0` on the two-core machine,
# 2026-12-07: 741 s down to 63 s): scheduled before the rest, so that no worker starts one of them when the others
# are nearly done. pyproject.toml passes `--no-loadscope-reorder`, as xdist otherwise orders modules by their
# number of tests. A module not named here keeps its place after them.
LONGEST_FIRST = [
    "tests/e2e/test_interrupt.py",
    "tests/integration/test_faults.py",
    "tests/e2e/test_retrain_flow.py",
    "tests/integration/test_integrity.py",
    "tests/integration/test_train_and_evaluate.py",
    "tests/e2e/test_growing_data.py",
    "tests/integration/test_tracking_server.py",
    "tests/integration/test_experiments.py",
    "tests/integration/test_ray_cluster.py",
    "tests/integration/test_video_pipeline.py",
    "tests/integration/test_http_download.py",
    "tests/integration/test_search.py",
    "tests/integration/test_spark_download.py",
]


def pytest_collection_modifyitems(config, items):
    """The longest modules first (a stable sort: the tests of a module keep their order)."""
    rank = {module: i for i, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


def pytest_unconfigure(config):
    """The run that made the session folder stops what is left in it and removes it."""
    if OWNS_SESSION_TEMP:
        from tests.session_temp import reap

        reap(SESSION_TEMP)


@pytest.fixture(scope="session")
def base_dir():
    """The bundled SmolLM2-135M, converted from its GGUF once per machine."""
    return resolve_base_model("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


def tiny_config(arch: str, vocab_size: int, attn: str = "eager"):
    """A small random config of ``arch`` (3 layers, width 64)."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if arch == "llama":
        cfg = tf.LlamaConfig(**common)
    elif arch == "gemma":
        cfg = tf.GemmaConfig(**common, head_dim=16)
    elif arch == "gemma2":
        # A window shorter than our sequences, so the sliding layers really slide.
        cfg = tf.Gemma2Config(**common, head_dim=16, sliding_window=6, query_pre_attn_scalar=16)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=vocab_size,
            n_embd=64,
            n_layer=3,
            n_head=4,
            n_positions=256,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    else:
        raise ValueError(arch)
    cfg._attn_implementation = attn
    return cfg


def tiny_lm(arch: str, tokenizer, attn: str = "eager", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), attn), attn_implementation=attn)
    # Random init has tiny weights; scale up so that layers do real mixing and bugs show.
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    return lm.eval()


@pytest.fixture(scope="session")
def tiny_base_dir(tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-base")
    tok = copy.deepcopy(tokenizer)
    lm = tiny_lm("llama", tok)
    lm.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tracking_server():
    """A real MLflow tracking server on PostgreSQL (127.0.0.1 only), started and stopped through
    ``mpe tracking-server``, the command ``make tracking-server`` runs. Its URL and folder."""
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from mpe.runtime.loopback import free_port, port_free
    from mpe.tracking.server import status

    # In the run's 0755 folder, not pytest's 0700 one: as root, PostgreSQL runs as an unprivileged user who
    # must reach it.
    folder = Path(tempfile.mkdtemp(prefix="pg-", dir=SESSION_TEMP))
    folder.chmod(0o755)
    port, pg_port = free_port(), None
    cmd = [sys.executable, "-m", "mpe.cli", "tracking-server"]
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            [*cmd, "start", "--dir", str(folder), "--port", str(port), "--workers", "1"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert out.returncode == 0, f"tracking server did not start:\n{out.stdout}\n{out.stderr}"
        pg_port = status(folder)["pg_port"]
        yield {"uri": f"http://127.0.0.1:{port}", "dir": folder, "pg_port": pg_port}
    finally:
        out = subprocess.run(
            [*cmd, "stop", "--dir", str(folder)], cwd=repo, capture_output=True, text=True, timeout=120
        )
        shutil.rmtree(folder, ignore_errors=True)
        assert out.returncode == 0, f"tracking server did not stop:\n{out.stdout}\n{out.stderr}"
        left = [p for p in (port, pg_port) if p and not port_free(p)]
        assert not left, f"ports still listening after `mpe tracking-server stop`: {left}"
