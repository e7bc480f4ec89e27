"""``/search`` over a search index, as ``mpe serve`` answers it: ``GET /search?q=…&k=…`` (JSON: each result's
id, score, per-prompt scores, caption, key, shard and image URL), ``GET /image/<id>`` (the image bytes from
its shard) and ``GET /`` (a page: a query box and the top-k images with captions, scores and which
adaptive prompt matched each).

A query is checked before the model sees it: present, not blank, valid UTF-8, no control characters, at
most ``serve.max_caption_chars`` characters; ``k`` an integer from 1 to ``search.max_k``. Anything else is a
400 naming the problem; the server goes on answering.
"""

from __future__ import annotations

import threading
import unicodedata
from importlib import resources
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from mpe.config import SearchConfig, ServeConfig
from mpe.errors import ConfigError, DataError
from mpe.serving.image_index import META_FILE, ImageIndex, model_sha256

DEFAULT_K = 12
ALLOWED_CONTROLS = "\t\n\r"  # typed or pasted whitespace: read as spaces


class QueryError(DataError):
    """A ``/search`` request the server refuses (400); the message says what to send instead."""


def parse_query(query_string: bytes, max_chars: int, max_k: int) -> tuple[str, int]:
    """``(q, k)`` of a raw query string, or a :class:`QueryError` naming what is wrong."""
    try:
        args = parse_qs(query_string.decode("utf-8"), keep_blank_values=True, encoding="utf-8", errors="strict")
    except UnicodeDecodeError as err:
        raise QueryError(f"the query string is not valid UTF-8 (byte {err.start}); percent-encode UTF-8 text") from None
    values = args.get("q", [])
    if len(values) != 1:
        raise QueryError("send one query text as q (/search?q=a+red+circle&k=10)")
    q = values[0]
    if len(q) > max_chars:
        raise QueryError(
            f"q has {len(q)} characters, over the limit of {max_chars} (the model reads a caption's first tokens only)"
        )
    bad = next(
        (c for c in q if unicodedata.category(c) in ("Cc", "Cs", "Co", "Cn") and c not in ALLOWED_CONTROLS), None
    )
    if bad is not None:
        raise QueryError(
            f"q holds the character U+{ord(bad):04X} at position {q.index(bad)}, which is not text "
            "(a control, private-use or unassigned code point)"
        )
    q = " ".join(q.split())
    if not q:
        raise QueryError("q is empty: type what the images should show")
    raw_k = args.get("k", [str(DEFAULT_K)])
    try:
        k = int(raw_k[-1])
    except ValueError:
        raise QueryError(f"k must be a whole number from 1 to {max_k}, got {raw_k[-1]!r:.40}") from None
    if not 1 <= k <= max_k:
        raise QueryError(f"k must be from 1 to {max_k}, got {k}")
    return q, k


def open_index_for(ref: str, folder, explicit=None, local=None, say=print) -> ImageIndex | None:
    """The search index to serve beside the model ``ref`` (its files in ``folder``): ``explicit`` (an error
    if built from another model), else the registered version's own index (its tag), else ``local`` if it
    was built from this model; None (and a line saying why) when there is none."""
    from pathlib import Path

    from mpe.serving.mlflow_model import registered_search_index

    sha = model_sha256(folder)
    if explicit is not None:
        index = ImageIndex(explicit)
        index.check_model(sha, ref)
        return index
    for candidate in (registered_search_index(ref), Path(local) if local else None):
        if candidate is None or not (Path(candidate) / META_FILE).is_file():
            continue
        try:
            index = ImageIndex(candidate)
        except ConfigError as err:  # found, not asked for: say why it is left out, and serve the model
            say(f"mpe serve: {err}; not used")
            continue
        if index.model_sha256 == sha:
            return index
        say(f"mpe serve: {candidate} holds the search index of another model; not used")
    say(f"mpe serve: no search index of {ref}: /search is off (build one: mpe index --model {ref})")
    return None


def prompt_names(count: int) -> list[str]:
    """What the page calls each part of a score: the adaptive prompt token it was read at."""
    return [f"APT-{i + 1}" for i in range(count)] if count > 1 else ["embedding"]


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error_code": code, "message": message}, status_code=status)


def search_routes(
    model, index: ImageIndex | None, serve_cfg: ServeConfig, cfg: SearchConfig, lock: threading.Lock
) -> APIRouter:
    """The search page and its JSON and image endpoints; ``lock`` is the server's one-forward-pass lock."""
    router = APIRouter()
    page = resources.files("mpe.serving").joinpath("search_page.html").read_text(encoding="utf-8")
    names = prompt_names(index.meta["num_prompts"]) if index is not None else []

    def embed(q: str):
        import torch

        with lock, torch.no_grad():
            return model.encode_text([q])[0].float().cpu().numpy()

    @router.get("/", response_class=HTMLResponse)
    def home():
        return HTMLResponse(page)

    @router.get("/search")
    async def search(request: Request):
        if index is None:
            return _error(
                503,
                "SEARCH_UNAVAILABLE",
                "this server has no search index: build one with `mpe index`, then restart `mpe serve` with --index",
            )
        try:
            q, k = parse_query(request.scope.get("query_string", b""), serve_cfg.max_caption_chars, cfg.max_k)
        except QueryError as err:
            return _error(400, "INVALID_QUERY", str(err))
        hits = index.search(await run_in_threadpool(embed, q), k)
        return {
            "query": q,
            "k": k,
            "count": index.meta["count"],
            "index_key": index.meta["index_key"],
            "model": index.meta["model"],
            "prompts": names,
            "results": [
                {
                    "rank": rank,
                    "id": h.id,
                    "score": round(h.score, 6),
                    "prompt_scores": [round(p, 6) for p in h.prompt_scores],
                    "best_prompt": int(max(range(len(h.prompt_scores)), key=h.prompt_scores.__getitem__)),
                    "caption": h.item.caption,
                    "key": h.item.key,
                    "split": h.item.split,
                    "shard": h.item.shard,
                    "url": h.item.url,
                    "image": f"/image/{h.id}",
                }
                for rank, h in enumerate(hits, 1)
            ],
        }

    @router.get("/image/{item_id}")
    def image(item_id: int):
        if index is None or not 0 <= item_id < len(index.items):
            return _error(404, "NOT_FOUND", f"no indexed image {item_id}")
        try:
            data, mime = index.image(item_id)
        except OSError as err:
            return _error(404, "IMAGE_UNAVAILABLE", f"image {item_id} cannot be read here ({err})")
        return Response(data, media_type=mime, headers={"Cache-Control": "max-age=3600"})

    return router
