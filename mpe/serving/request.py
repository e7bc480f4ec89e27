"""One embedding request as MLflow's scoring protocol carries it: a table whose rows each hold a
``text`` caption or a base64 ``image``. The request is checked against the serving limits (rows, caption
length, each image's size and all its images' decoded pixels, read from their headers before any pixel is
decoded), its rows are checked one by one (every error names its row), each image is shrunk to the
vision tower's input as soon as it is decoded (so no full-size picture outlives its row), and texts and
images are embedded in batches. The logged pyfunc and ``mpe serve`` both call :func:`embed_rows`, so the
two servers answer the same request with the same numbers and the same messages."""

from __future__ import annotations

import base64
import binascii
import io
import math

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from mpe.config import ServeConfig
from mpe.errors import DataError
from mpe.model.vision.preprocess import ImageTransform

COLUMNS = ("text", "image")
MAX_ERRORS_SHOWN = 5
# The towers see image_size pixels a side; a bigger picture only costs memory to decode (a small PNG can
# hold a huge blank canvas), so its header is checked before its pixels are read.
MAX_IMAGE_PIXELS = 4096 * 4096


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


def _image_bytes(row: int, raw, transform: ImageTransform) -> tuple[bytes, int]:
    """The image's bytes and its pixel count, read from its header (nothing decoded yet)."""
    if isinstance(raw, str):
        try:
            # validate=True: the default silently drops characters outside the alphabet
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError) as err:
            raise DataError(f"row {row}: 'image' is not valid base64 ({err})") from None
    elif isinstance(raw, (bytes, bytearray)):
        data = bytes(raw)
    else:
        raise DataError(f"row {row}: 'image' must be a base64 string, not {type(raw).__name__}")
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


def decode_rows(
    df: pd.DataFrame, limits: ServeConfig, transform: ImageTransform
) -> tuple[list[int], list[str], list[int], torch.Tensor | None]:
    """``(text_rows, texts, image_rows, image_inputs)`` of a request table: each image decoded and shrunk to
    the tower's input by ``transform`` one at a time, stacked. A :class:`DataError` naming
    every bad row (the first few) when a row holds neither or both fields, a caption that is not text or
    longer than ``limits.max_caption_chars``, or an image that is not base64 of a readable picture, or
    when the request's images together are over ``limits.max_request_megapixels`` (read from their
    headers: nothing is decoded then)."""
    check_row_count(len(df), limits)
    if df.columns.duplicated().any():
        raise DataError(f"columns {_names(df.columns)}: a column is named twice")
    unknown = [c for c in df.columns if c not in COLUMNS]
    if unknown or not any(c in df.columns for c in COLUMNS):
        raise DataError(
            f"columns {_names(df.columns)}: expected 'text' and/or 'image'"
            + (f" (unknown: {_names(unknown)})" if unknown else "")
        )
    n = len(df)
    texts_col = df["text"].tolist() if "text" in df else [None] * n
    images_col = df["image"].tolist() if "image" in df else [None] * n
    text_rows, texts, image_rows, encoded, pixels, errors = [], [], [], [], [], []
    for i, (t, im) in enumerate(zip(texts_col, images_col)):
        try:
            has_text, has_image = not _absent(t), not _absent(im)
            if has_text and has_image:
                raise DataError(f"row {i}: has both 'text' and 'image'; send one per row")
            if not has_text and not has_image:
                raise DataError(f"row {i}: has neither a 'text' string nor an 'image' (base64)")
            if has_text:
                texts.append(_text(i, t, limits.max_caption_chars))
                text_rows.append(i)
            else:
                data, count = _image_bytes(i, im, transform)
                encoded.append(data)
                pixels.append(count)
                image_rows.append(i)
        except DataError as err:
            errors.append(str(err))
    _raise_collected(errors)
    _check_pixel_budget(image_rows, pixels, limits)
    inputs = []
    for i, data in zip(image_rows, encoded):
        try:
            inputs.append(_decoded(i, data, transform))
        except DataError as err:
            errors.append(str(err))
    _raise_collected(errors)
    return text_rows, texts, image_rows, torch.stack(inputs) if inputs else None


@torch.no_grad()
def embed_rows(model, df: pd.DataFrame, limits: ServeConfig | None = None) -> np.ndarray:
    """``(rows, embed_dim)`` float32 L2-normalised embeddings, row ``i`` for the request's row ``i``, under
    the serving ``limits`` (default: ``ServeConfig()``'s, what ``mpe serve`` applies without params)."""
    limits = limits or ServeConfig()
    text_rows, texts, image_rows, images = decode_rows(df, limits, model.image_transform)
    out = np.zeros((len(df), model.cfg.embed_dim), dtype=np.float32)
    if texts:
        out[text_rows] = model.encode_text(texts).float().cpu().numpy()
    if images is not None:
        out[image_rows] = model.encode_pixels(images).float().cpu().numpy()
    return out
