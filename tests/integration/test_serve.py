"""``mpe serve`` as a real subprocess on 127.0.0.1, serving a model registered in a test-local sqlite
MLflow store (``models:/mpe-multiprompt@champion``), driven over HTTP with httpx: embeddings equal the
model's own ``encode_text`` / ``encode_image`` in this process; every bad request gets a 4xx naming the
problem and the row, and the next good request still succeeds."""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mpe.config import ModelConfig, ServeConfig
from mpe.model.multi_prompt_clip import MultiPromptCLIP
from tests.server_process import running as _running

MODEL = "models:/mpe-multiprompt@champion"
MAX_BODY_MB = 2  # small, so the over-limit body stays cheap; a 1 MB caption still fits under it
CAPTION_LIMIT = ServeConfig().max_caption_chars
TEXTS = ["a large red circle on a striped background", "two small blue squares"]


def _png(color, size=32, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format=fmt)
    return buf.getvalue()


IMAGES = [_png((200, 30, 30)), _png((20, 60, 220), size=48, fmt="JPEG")]


def _gray_png(side: int | tuple[int, int], shade: int) -> bytes:
    """A flat grayscale canvas: a few kB as PNG, ``side``² bytes once decoded (3× that as RGB)."""
    buf = io.BytesIO()
    Image.new("L", side if isinstance(side, tuple) else (side, side), shade).save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def model_dir(tiny_base_dir, tmp_path_factory):
    cfg = ModelConfig.model_validate(
        {
            "embed_dim": 64,
            "text": {"num_prompts": 2, "max_caption_tokens": 32},
            "vision": {
                "image_size": 32,
                "patch_size": 8,
                "hidden_size": 64,
                "num_layers": 2,
                "num_heads": 2,
                "intermediate_size": 128,
            },
        }
    )
    out = tmp_path_factory.mktemp("serve") / "model"
    MultiPromptCLIP.from_base(tiny_base_dir, cfg, seed=0).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def registered(model_dir):
    """The model logged as our pyfunc and registered as mpe-multiprompt@champion in a local sqlite store."""
    import mlflow

    from mpe.serving.mlflow_model import log_pyfunc
    from mpe.tracking.runs import use
    from mpe.tracking.settings import TrackingSettings

    root = model_dir.parent
    settings = TrackingSettings(f"sqlite:///{root / 'mlruns.db'}", (root / "mlartifacts").as_uri(), "serve-test")
    before = mlflow.get_tracking_uri()
    try:
        client = use(settings)
        with mlflow.start_run():
            uri = log_pyfunc(model_dir, 64)
        version = mlflow.register_model(uri, "mpe-multiprompt")
        client.set_registered_model_alias("mpe-multiprompt", "champion", version.version)
    finally:
        mlflow.set_tracking_uri(before)  # other tests' stores stay theirs
    return settings.tracking_uri


@pytest.fixture(scope="module")
def server(registered, model_dir):
    with _running(
        [
            sys.executable,
            "-m",
            "mpe.cli",
            "serve",
            "--model",
            MODEL,
            "--tracking-uri",
            registered,
            "--max-body-mb",
            str(MAX_BODY_MB),
        ],
        model_dir.parent,
    ) as client:
        yield client


@pytest.fixture(scope="module")
def reference(model_dir):
    """Embeddings computed in this process by the saved model itself."""
    m = MultiPromptCLIP.from_pretrained(model_dir)
    with torch.no_grad():
        t = m.encode_text(TEXTS).numpy()
        v = m.encode_image([Image.open(io.BytesIO(b)).convert("RGB") for b in IMAGES]).numpy()
    return t, v


def _split(rows, columns=("text", "image")) -> dict:
    return {"dataframe_split": {"columns": list(columns), "data": rows}}


GOOD = _split([[TEXTS[0], None], [None, _b64(IMAGES[0])], [TEXTS[1], None], [None, _b64(IMAGES[1])]])


def _check_good(client, reference):
    r = client.post("/invocations", json=GOOD)
    assert r.status_code == 200, r.text
    out = np.asarray(r.json()["predictions"], dtype=np.float32)
    t, v = reference
    assert out.shape == (4, 64)
    np.testing.assert_allclose(out[[0, 2]], t, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[[1, 3]], v, rtol=0, atol=1e-6)


def test_embeddings_equal_the_models_own(server, reference):
    _check_good(server, reference)
    # text-only and image-only requests (one column) give the same rows
    r = server.post("/invocations", json=_split([[TEXTS[1]]], columns=["text"]))
    np.testing.assert_allclose(np.asarray(r.json()["predictions"], np.float32)[0], reference[0][1], atol=1e-6)
    recs = {"dataframe_records": [{"image": _b64(IMAGES[0])}]}
    r = server.post("/invocations", json=recs)
    np.testing.assert_allclose(np.asarray(r.json()["predictions"], np.float32)[0], reference[1][0], atol=1e-6)


BAD = {
    "missing_column": (_split([["a red circle"]], columns=["caption"]), 400, ["'caption'", "'text'", "'image'"]),
    "both_null": (_split([["a red circle", None], [None, None]]), 400, ["row 1", "neither"]),
    "both_set": (_split([["a red circle", _b64(IMAGES[0])]]), 400, ["row 0", "both"]),
    "invalid_base64": (_split([[TEXTS[0], None], [None, "not*base64!"]]), 400, ["row 1", "not valid base64"]),
    "not_an_image": (_split([[None, _b64(b"plain text, not a picture")]]), 400, ["row 0", "not an image", "25 bytes"]),
    "1MB_caption": (
        _split([[TEXTS[0], None], ["x" * 2**20, None]]),
        400,
        ["row 1", f"{2**20} characters", f"limit of {CAPTION_LIMIT}"],
    ),
    "huge_image": (_split([[None, _b64(_png((0, 0, 0), size=4200))]]), 400, ["row 0", "4200×4200 pixels"]),
    "column_twice": (_split([["a", "b"]], columns=["text", "text"]), 400, ["named twice"]),
    "text_not_string": (_split([[42, None]]), 400, ["row 0", "must be a string"]),
    "ragged_row": (_split([["a red circle"]]), 400, ["row 0", "expected a list of 2 values"]),
    "malformed_json": (b'{"dataframe_split": {"columns": ["text"], "data": [["a"]', 400, ["malformed JSON"]),
    "wrong_top_level": ({"instances": [{"text": "a"}]}, 400, ["'dataframe_split'", "instances"]),
    "body_over_limit": (_split([["y" * (MAX_BODY_MB * 2**20 + 10), None]]), 413, [f"limit of {MAX_BODY_MB} MiB"]),
    "too_many_rows": (_split([["a", None]] * 300), 400, ["300 rows", "limit of 256"]),
    "column_not_a_name": (_split([["a"]], columns=[{"a": 1}]), 400, ["columns must be names", "dict"]),
    "both_table_forms": ({**_split([["a", None]]), "dataframe_records": [{"text": "b"}]}, 400, ["both", "send one"]),
    "100k_columns": (_split([["a"] * 100_000], columns=[f"c{i}" for i in range(100_000)]), 400, ["(100000 in all)"]),
    # 16.8 MP, yet the tower's input is cut from it resized to 32×536870912 (what made the server try 51 GB)
    "elongated_image": (_split([[None, _b64(_gray_png((1, 4096 * 4096), 0))]]), 400, ["row 0", "too elongated"]),
    "lone_surrogate": (_split([[TEXTS[0], None], ["a red \ud800 circle", None]]), 400, ["row 1", "lone surrogate"]),
    # 8 × 16.8 MP (16 kB each as PNG): inside the body and row limits, over the decoded-pixel budget
    "pixels_over_budget": (
        _split([[None, _b64(_gray_png(4096, i))] for i in range(8)]),
        400,
        ["134.2 megapixels", "limit of 128", "serve.max_request_megapixels", "before row 7 fit"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_is_4xx_naming_the_problem_and_the_server_keeps_serving(server, reference, case):
    body, status, phrases = BAD[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = server.post("/invocations", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    message = r.json()["message"]
    assert len(r.content) < 2000, r.content[:300]  # an answer names the problem; it does not echo the request
    for phrase in phrases:
        assert phrase in message, (phrase, message)
    _check_good(server, reference)


def _status_kb(pid: int, field: str) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def test_large_images_are_decoded_one_at_a_time_and_embed_as_the_models_own(model_dir, reference):
    """Six 4096² grayscale PNGs (16 kB each, 101 MP in all: inside every limit): each is shrunk to the
    tower's input as soon as it is decoded, so the server's peak memory grows by about one decoded picture
    (48 MiB as RGB), not by all six (288 MiB, what holding every decoded image before embedding took).
    A server of its own: memory an earlier request freed would hide the growth."""
    pngs = [_gray_png(4096, 40 * i) for i in range(6)]
    with _running([sys.executable, "-m", "mpe.cli", "serve", "--model", str(model_dir)], model_dir.parent) as client:
        _check_good(client, reference)  # warm: the first pass allocates what every pass reuses
        pid = client.server_pid
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current RSS
        before = _status_kb(pid, "VmRSS")
        r = client.post("/invocations", json=_split([[None, _b64(p)] for p in pngs]))
        assert r.status_code == 200, r.text
        growth_mib = (_status_kb(pid, "VmHWM") - before) / 1024
    one_picture_mib = 4096 * 4096 * 3 / 2**20
    assert growth_mib < 2.5 * one_picture_mib, growth_mib
    m = MultiPromptCLIP.from_pretrained(model_dir)
    with torch.no_grad():
        own = m.encode_image([Image.open(io.BytesIO(p)).convert("RGB") for p in pngs[:2]]).numpy()
    np.testing.assert_allclose(np.asarray(r.json()["predictions"], np.float32)[:2], own, rtol=0, atol=1e-6)


def test_wrong_content_type_is_415(server, reference):
    r = server.post("/invocations", content=b"text,image\na,\n", headers={"content-type": "text/csv"})
    assert r.status_code == 415 and "application/json" in r.json()["message"]
    latin1 = json.dumps(_split([["a café", None]]), ensure_ascii=False).encode("latin-1")
    r = server.post("/invocations", content=latin1, headers={"content-type": "application/json; charset=latin-1"})
    assert r.status_code == 415 and "UTF-8" in r.json()["message"]
    _check_good(server, reference)


def test_model_folder_forms(registered, model_dir, tmp_path):
    """A save_pretrained folder serves itself; a logged MLflow model folder (what ``mlflow models serve -m``
    takes) serves the folder its MLmodel names; anything else is refused by name."""
    import mlflow

    from mpe.errors import ConfigError
    from mpe.serving.server import model_folder

    assert model_folder(str(model_dir)) == model_dir
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(registered)
    try:
        logged = Path(mlflow.artifacts.download_artifacts(artifact_uri=MODEL, dst_path=str(tmp_path)))
    finally:
        mlflow.set_tracking_uri(before)
    inside = model_folder(str(logged))
    assert sorted(p.name for p in inside.iterdir()) == sorted(p.name for p in model_dir.iterdir())
    assert (inside / "mpe_weights.safetensors").read_bytes() == (model_dir / "mpe_weights.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="neither a model folder"):
        model_folder(str(tmp_path / "nope"))


@pytest.mark.slow
def test_mlflow_models_serve_answers_the_same(registered, model_dir, reference):
    """MLflow's own scoring server on the registered pyfunc: the same embeddings, and the pyfunc's row
    errors reach the client as 400 with our message (MLflow prefixes the table it failed on)."""
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    with _running(
        [str(mlflow_cli), "models", "serve", "-m", MODEL, "--env-manager", "local", "-h", "127.0.0.1"],
        model_dir.parent,
        {"MLFLOW_TRACKING_URI": registered},
    ) as client:
        _check_good(client, reference)
        r = client.post("/invocations", json=_split([["a red circle", None], [None, None]]))
        assert r.status_code == 400 and "row 1: has neither" in r.json()["message"]
        _check_good(client, reference)
        # the limits of `mpe serve`, refused before any row is embedded (10k rows used to run on after a 504)
        for case in ("too_many_rows", "lone_surrogate", "pixels_over_budget"):
            body, status, phrases = BAD[case]
            r = client.post(
                "/invocations", content=json.dumps(body).encode(), headers={"content-type": "application/json"}
            )
            assert r.status_code == status and "stack_trace" not in r.json(), r.text[:2000]
            assert all(p in r.json()["message"] for p in phrases), (phrases, r.json()["message"][-500:])
        r = client.post("/invocations", json=_split([["a", None]] * 10_000))
        assert r.status_code == 400 and "10000 rows, over the limit of 256" in r.json()["message"]
        _check_good(client, reference)


def test_the_pyfunc_answers_its_own_failure_with_500_and_keeps_the_traceback_in_its_log(registered, caplog):
    """A failure inside the model (here its text tower gone) is the server's, not the client's: MLflow's
    server would answer any other exception with 400 and the traceback, server paths included, in the
    body; the pyfunc raises a 500 that names no path and logs the traceback."""
    import mlflow
    from mlflow.exceptions import MlflowException

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(registered)
    try:
        loaded = mlflow.pyfunc.load_model(MODEL)
        limited = mlflow.pyfunc.load_model(MODEL, model_config={"max_rows": 2})
    finally:
        mlflow.set_tracking_uri(before)
    import pandas as pd

    with pytest.raises(MlflowException, match="3 rows, over the limit of 2") as refused:
        limited.predict(pd.DataFrame({"text": ["a", "b", "c"]}))
    assert refused.value.get_http_status_code() == 400
    loaded.unwrap_python_model().model.text = None  # a broken model, as a bad deployment would leave it
    with pytest.raises(MlflowException) as failed, caplog.at_level("ERROR", logger="mpe.serve"):
        loaded.predict(pd.DataFrame({"text": ["a red circle"]}))
    assert failed.value.get_http_status_code() == 500
    body = json.loads(failed.value.serialize_as_json())
    assert "stack_trace" not in body and "/" not in body["message"], body
    assert "Traceback" in caplog.text and "NoneType" in caplog.text
