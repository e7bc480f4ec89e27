"""``mpe serve``: the embedding model behind HTTP, speaking MLflow's scoring protocol.

``POST /invocations`` takes ``{"dataframe_split": {"columns": [...], "data": [...]}}`` (or
``dataframe_records``) with ``text`` and/or base64 ``image`` columns and answers ``{"predictions":
[[...], ...]}``, one embedding per row, as ``mlflow models serve`` does with the logged pyfunc. Unlike
MLflow's server it bounds the request body (413) and the row count, answers every bad request with a 4xx
naming the problem and the row, and keeps 5xx for its own failures (MLflow maps any exception the model
raises to 400). ``GET /ping`` and ``/health`` answer 200 once the model is loaded. With a search index it
also answers ``/search`` and serves the search page at ``/`` (``mpe.serving.search``).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from mpe.config import SearchConfig, ServeConfig
from mpe.errors import ConfigError, DataError

log = logging.getLogger("mpe.serve")
REGISTRY_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def model_folder(ref: str, tracking_uri: str | None = None) -> Path:
    """The ``save_pretrained`` folder behind ``ref``: a registry or run URI (downloaded from the tracking
    store), a logged MLflow model folder (its ``artifacts/mpe_model``), or a model folder itself."""
    if ref.startswith(REGISTRY_SCHEMES):
        import mlflow

        from mpe.serving.mlflow_model import download_model_folder

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        try:
            return download_model_folder(ref)
        except mlflow.exceptions.MlflowException as err:
            raise ConfigError(
                f"{ref}: not found in the tracking store {mlflow.get_tracking_uri()} ({err.message.splitlines()[0]})"
            ) from None
    path = Path(ref)
    if not path.is_dir():
        raise ConfigError(f"{ref}: neither a model folder nor a models:/ or runs:/ URI")
    if (path / "MLmodel").is_file():  # a logged pyfunc folder (``mlflow models serve -m`` takes those too)
        from mpe.serving.mlflow_model import pyfunc_model_folder

        return pyfunc_model_folder(path)
    return path  # MultiPromptCLIP.from_pretrained names what a non-model folder lacks


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error_code": code, "message": message}, status_code=status)


def request_frame(payload, limits: ServeConfig):
    """The request table of a decoded JSON body; :class:`DataError` naming what is wrong with its shape."""
    import pandas as pd

    from mpe.serving.request import check_row_count

    if not isinstance(payload, dict) or not ({"dataframe_split", "dataframe_records"} & payload.keys()):
        keys = list(payload)[:8] if isinstance(payload, dict) else type(payload).__name__
        raise DataError(f"the body must be an object with 'dataframe_split' (or 'dataframe_records'); got {keys}")
    if {"dataframe_split", "dataframe_records"} <= payload.keys():
        raise DataError("the body holds both 'dataframe_split' and 'dataframe_records'; send one")
    if "dataframe_split" in payload:
        split = payload["dataframe_split"]
        if (
            not isinstance(split, dict)
            or not isinstance(split.get("columns"), list)
            or not isinstance(split.get("data"), list)
        ):
            raise DataError("'dataframe_split' must be an object with a 'columns' list and a 'data' list of rows")
        columns, rows = split["columns"], split["data"]
        if not all(isinstance(c, str) for c in columns):
            bad = next(c for c in columns if not isinstance(c, str))
            raise DataError(f"'dataframe_split' columns must be names (strings), not {type(bad).__name__}: {bad!r:.60}")
        for i, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != len(columns):
                raise DataError(
                    f"row {i}: expected a list of {len(columns)} values (columns {columns}), got {row!r:.80}"
                )
    else:
        rows = payload["dataframe_records"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError("'dataframe_records' must be a list of objects")
        columns = sorted({k for r in rows for k in r})
        rows = [[r.get(c) for c in columns] for r in rows]
    if not rows:
        raise DataError("the request holds no rows")
    check_row_count(len(rows), limits)
    return pd.DataFrame(rows, columns=columns, dtype=object)


def create_app(model, cfg: ServeConfig, index=None, search: SearchConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``model`` (a loaded ``MultiPromptCLIP``) under the limits of ``cfg``; ``index``
    (an ``ImageIndex`` built from this model) adds ``/search`` and its page."""
    from starlette.concurrency import run_in_threadpool

    from mpe import __version__
    from mpe.serving.request import embed_rows

    app = FastAPI(title="mpe embeddings", version=__version__)
    max_body = int(cfg.max_body_mb * 2**20)
    # One forward pass at a time: concurrent passes would only split the same CPU cores (or GPU) and
    # multiply peak memory; requests queue instead.
    lock = threading.Lock()

    def predict(df):
        with lock:
            return embed_rows(model, df, cfg)

    @app.get("/ping")
    @app.get("/health")
    def ping():
        return {"status": "ok"}

    @app.get("/version")
    def version():
        return {"mpe": __version__}

    @app.post("/invocations")
    async def invocations(request: Request):
        mime, *params = [p.strip().lower() for p in request.headers.get("content-type", "").split(";")]
        charset = next((p.partition("=")[2].strip('"') for p in params if p.startswith("charset=")), "utf-8")
        if mime != "application/json" or charset not in ("utf-8", "utf8"):
            return _error(
                415,
                "UNSUPPORTED_MEDIA_TYPE",
                f"content type {request.headers.get('content-type') or '(none)'!r}: send application/json in "
                "UTF-8 (MLflow's dataframe_split)",
            )
        declared = request.headers.get("content-length")
        too_big = f"the body is over the limit of {cfg.max_body_mb:g} MiB ({max_body} bytes); send fewer rows"
        if declared and declared.isdigit() and int(declared) > max_body:
            return _error(413, "REQUEST_TOO_LARGE", f"{too_big} (content-length {declared})")
        body = bytearray()
        async for chunk in request.stream():  # a chunked body has no content-length: count as it comes
            body += chunk
            if len(body) > max_body:
                return _error(413, "REQUEST_TOO_LARGE", too_big)
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as err:  # JSONDecodeError, bad UTF-8, nesting too deep
            return _error(400, "MALFORMED_REQUEST", f"malformed JSON body: {err}")
        try:
            out = await run_in_threadpool(predict, request_frame(payload, cfg))
        except DataError as err:
            return _error(400, "INVALID_PARAMETER_VALUE", str(err))
        except Exception:  # our bug, not the client's: log it, answer 500, keep serving
            log.exception("embedding failed")
            return _error(500, "INTERNAL_ERROR", "the server failed to embed this request; see its log")
        return JSONResponse({"predictions": out.tolist()})

    from mpe.serving.search import search_routes

    app.include_router(search_routes(model, index, cfg, search or SearchConfig(), lock))
    return app


def serve(
    ref: str,
    cfg: ServeConfig,
    tracking_uri: str | None = None,
    index_dir=None,
    search: SearchConfig | None = None,
    local_index=None,
) -> None:
    """Load the model behind ``ref`` and serve it until interrupted; with a search index of that very model
    (``index_dir``, the registered version's, or ``local_index``), ``/search`` and its page too."""
    import uvicorn

    from mpe.model.multi_prompt_clip import MultiPromptCLIP
    from mpe.serving.search import open_index_for

    folder = model_folder(ref, tracking_uri)
    searching = index_dir is not None or local_index is not None  # neither: embeddings only (--no-search)
    index = open_index_for(ref, folder, index_dir, local_index) if searching else None
    model = MultiPromptCLIP.from_pretrained(folder).eval()
    print(f"mpe serve: {ref} (embed_dim {model.cfg.embed_dim}) on http://{cfg.host}:{cfg.port}/invocations", flush=True)
    if index is not None:
        print(f"mpe serve: search over {index.meta['count']} images on http://{cfg.host}:{cfg.port}/", flush=True)
    # a query string may be long (the search page sends what was typed): let it reach /search, which answers
    # an over-long query with a 400 naming the limit, rather than h11's bare "Invalid HTTP request"
    uvicorn.run(
        create_app(model, cfg, index, search),
        host=cfg.host,
        port=cfg.port,
        log_level="info",
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=1 << 20,
    )
