"""One embedding request as MLflow's scoring protocol carries it: a table whose rows each hold a
``text`` caption, a base64 ``image`` or a base64 ``video`` (an mp4, webm …: the whole file's bytes). The
request is checked against the serving limits (rows, caption length, each image's size and all its
images' decoded pixels, read from their headers before any pixel is decoded), its rows are checked one by
one (every error names its row), each image is shrunk to the vision tower's input as soon as it is decoded
(so no full-size picture outlives its row), and texts, images and videos are embedded in batches. The
logged pyfunc and ``mpe serve`` both call :func:`embed_rows`, so the two servers answer the same request
with the same numbers and the same messages.

A video travels as base64 in the row, not as a path on the server: the request is then self-contained
(the same for ``mpe serve``, the pyfunc under ``mlflow models serve`` and ``predict`` in a notebook, on
any host), and the server never opens a file a client names — no allowed-folder setting to get wrong, no
path traversal. The cost is size: a clip must fit in the body limit (``serve.max_body_mb``), as the
short clips retrieval works on do (a 10 s MSR-VTT clip is ~1 MB)."""

from __future__ import annotations

import base64
import binascii
import io
import math
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from mpe.config import ServeConfig
from mpe.errors import DataError
from mpe.model.vision.preprocess import ImageTransform

COLUMNS = ("text", "image", "video")
MAX_ERRORS_SHOWN = 5
# The towers see image_size pixels a side; a bigger picture only costs memory to decode (a small PNG can
# hold a huge blank canvas), so its header is checked before its pixels are read.
MAX_IMAGE_PIXELS = 4096 * 4096
# A clip is decoded whole to sample its frames: bound the work one row can ask for (100 s at 30 fps).
MAX_VIDEO_FRAMES = 3000


def _absent(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _names(columns, shown: int = 8) -> str:
    """Column names for a message: the first few (a request may name thousands)."""
    names = [repr(str(c)) for c in columns]
    if not names:
        return "(none)"
    return ", ".join(names[:shown]) + (f" … ({len(names)} in all)" if len(names) > shown else "")


def check_row_count(rows: int, limits: ServeConfig) -> None:
    """Refuse a request of more than ``limits.max_rows`` rows before anything of it is read."""
    if rows > limits.max_rows:
        raise DataError(f"the request holds {rows} rows, over the limit of {limits.max_rows}; split it")


def _text(row: int, t, max_chars: int) -> str:
    if not isinstance(t, str):
        raise DataError(f"row {row}: 'text' must be a string, not {type(t).__name__}")
    if not t.strip():
        raise DataError(f"row {row}: 'text' is blank")
    if len(t) > max_chars:
        raise DataError(
            f"row {row}: 'text' has {len(t)} characters, over the limit of {max_chars} "
            "(the model reads a caption's first tokens only)"
        )
    try:
        t.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON's "\ud800" escape decodes to a lone surrogate: no character at all
        raise DataError(
            f"row {row}: 'text' holds a lone surrogate ({t[err.start]!r} at character {err.start}), which is "
            "not Unicode text; send the character's full UTF-16 pair or its UTF-8"
        ) from None
    return t


def _bytes_of(row: int, column: str, raw) -> bytes:
    if isinstance(raw, str):
        try:
            # validate=True: the default silently drops characters outside the alphabet
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError) as err:
            raise DataError(f"row {row}: '{column}' is not valid base64 ({err})") from None
    if isinstance(raw, (bytes, bytearray)):
        return bytes(raw)
    raise DataError(f"row {row}: '{column}' must be a base64 string, not {type(raw).__name__}")


def _decode_video(row: int, raw, num_frames: int) -> list[Image.Image]:
    from mpe.data.video_codec import decode_clip

    data = _bytes_of(row, "video", raw)
    return decode_clip(data, num_frames, f"row {row}: 'video' ({len(data)} bytes)", MAX_VIDEO_FRAMES).frames


def _image_bytes(row: int, raw, transform: ImageTransform) -> tuple[bytes, int]:
    """The image's bytes and its pixel count, read from its header (nothing decoded yet)."""
    data = _bytes_of(row, "image", raw)
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except UnidentifiedImageError:
        raise DataError(
            f"row {row}: 'image' is valid base64 but not an image ({len(data)} bytes in no format PIL reads)"
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(
            f"row {row}: 'image' is valid base64 but not an image PIL can read ({len(data)} bytes: {err})"
        ) from None
    check_image_size(f"row {row}: 'image'", w, h, transform)
    return data, w * h


def check_image_size(what: str, w: int, h: int, transform: ImageTransform) -> None:
    """Refuse, from its header, a picture that would cost more memory than the model can use: over
    4096×4096 pixels, or so elongated that resizing it to the tower's input size is (a 1×16M strip is
    resized to 32×536M before its centre is cut out)."""
    if w * h > MAX_IMAGE_PIXELS:
        raise DataError(
            f"{what} is {w}×{h} pixels, over the limit of {MAX_IMAGE_PIXELS} (4096×4096); downscale it first"
        )
    rw, rh = transform.resized_size(w, h)
    if rw * rh > MAX_IMAGE_PIXELS:
        raise DataError(
            f"{what} is {w}×{h} pixels, too elongated: the model's input is cut from it resized to {rw}×{rh}, "
            f"over the limit of {MAX_IMAGE_PIXELS} pixels; crop it nearer to a square first"
        )


def _decoded(row: int, data: bytes, transform: ImageTransform) -> torch.Tensor:
    """The image decoded and at once shrunk to the tower's ``(3, size, size)`` uint8 input."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return transform.to_uint8(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # truncated, corrupt
        raise DataError(
            f"row {row}: 'image' is valid base64 but not an image PIL can read ({len(data)} bytes: {err})"
        ) from None


def _raise_collected(errors: list[str]) -> None:
    if errors:
        more = f"; and {len(errors) - MAX_ERRORS_SHOWN} more bad rows" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise DataError("; ".join(errors[:MAX_ERRORS_SHOWN]) + more)


def _check_pixel_budget(image_rows: list[int], pixels: list[int], limits: ServeConfig) -> None:
    budget = limits.max_request_megapixels * 1e6
    total = sum(pixels)
    if total > budget:
        fit, running = 0, 0
        while fit < len(pixels) and running + pixels[fit] <= budget:
            running += pixels[fit]
            fit += 1
        upto = f"the images before row {image_rows[fit]} fit" if fit else "its first image alone does not fit"
        raise DataError(
            f"the request's {len(pixels)} images hold {total / 1e6:.1f} megapixels once decoded, over the limit "
            f"of {limits.max_request_megapixels:g} (serve.max_request_megapixels; {upto}); "
            "send fewer or smaller images per request"
        )


class Rows(NamedTuple):
    """A request's rows by kind: the row numbers and the model inputs of each."""

    text_rows: list[int]
    texts: list[str]
    image_rows: list[int]
    images: torch.Tensor | None  # (N, 3, size, size) uint8, each shrunk as it was decoded
    video_rows: list[int]
    videos: list[list[Image.Image]]


def decode_rows(df: pd.DataFrame, limits: ServeConfig, transform: ImageTransform, num_frames: int = 8) -> Rows:
    """The rows of a request table by kind: each image decoded and shrunk to the tower's input by
    ``transform`` one at a time, stacked; each video as ``num_frames`` frames. A :class:`DataError` naming
    every bad row (the first few) when a row holds no field or more than one, a caption that is not text or
    longer than ``limits.max_caption_chars``, an image that is not base64 of a readable picture, a video that
    is not base64 of a clip that decodes, or when the request's images together are over
    ``limits.max_request_megapixels`` (read from their headers: nothing is decoded then)."""
    check_row_count(len(df), limits)
    if df.columns.duplicated().any():
        raise DataError(f"columns {_names(df.columns)}: a column is named twice")
    unknown = [c for c in df.columns if c not in COLUMNS]
    if unknown or not any(c in df.columns for c in COLUMNS):
        raise DataError(
            f"columns {_names(df.columns)}: expected 'text', 'image' and/or 'video'"
            + (f" (unknown: {_names(unknown)})" if unknown else "")
        )
    n = len(df)
    texts_col, images_col, videos_col = (df[c].tolist() if c in df else [None] * n for c in COLUMNS)
    text_rows, texts, image_rows, encoded, pixels, errors = [], [], [], [], [], []
    video_rows, video_raw = [], []
    for i, (t, im, vid) in enumerate(zip(texts_col, images_col, videos_col)):
        try:
            given = [c for c, v in zip(COLUMNS, (t, im, vid)) if not _absent(v)]
            if len(given) > 1:
                named = ", ".join(map(repr, given[:-1])) + f" and {given[-1]!r}"
                raise DataError(f"row {i}: has {'both ' if len(given) == 2 else ''}{named}; send one per row")
            if not given:
                raise DataError(f"row {i}: has neither a 'text' string nor an 'image' or 'video' (base64)")
            if given[0] == "text":
                texts.append(_text(i, t, limits.max_caption_chars))
                text_rows.append(i)
            elif given[0] == "image":
                data, count = _image_bytes(i, im, transform)
                encoded.append(data)
                pixels.append(count)
                image_rows.append(i)
            else:
                video_raw.append(vid)
                video_rows.append(i)
        except DataError as err:
            errors.append(str(err))
    _raise_collected(errors)
    _check_pixel_budget(image_rows, pixels, limits)
    inputs, videos = [], []
    for i, data in zip(image_rows, encoded):
        try:
            inputs.append(_decoded(i, data, transform))
        except DataError as err:
            errors.append(str(err))
    for i, raw in zip(video_rows, video_raw):
        try:
            videos.append(_decode_video(i, raw, num_frames))
        except DataError as err:
            errors.append(str(err))
    _raise_collected(errors)
    return Rows(text_rows, texts, image_rows, torch.stack(inputs) if inputs else None, video_rows, videos)


@torch.no_grad()
def embed_rows(model, df: pd.DataFrame, limits: ServeConfig | None = None) -> np.ndarray:
    """``(rows, embed_dim)`` float32 L2-normalised embeddings, row ``i`` for the request's row ``i``, under
    the serving ``limits`` (default: ``ServeConfig()``'s, what ``mpe serve`` applies without params)."""
    limits = limits or ServeConfig()
    rows = decode_rows(df, limits, model.image_transform, model.cfg.video.num_frames)
    out = np.zeros((len(df), model.cfg.embed_dim), dtype=np.float32)
    if rows.texts:
        out[rows.text_rows] = model.encode_text(rows.texts).float().cpu().numpy()
    if rows.images is not None:
        out[rows.image_rows] = model.encode_pixels(rows.images).float().cpu().numpy()
    if rows.videos:
        out[rows.video_rows] = model.encode_video(rows.videos).float().cpu().numpy()
    return out
