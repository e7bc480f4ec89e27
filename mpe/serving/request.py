"""One embedding request as MLflow's scoring protocol carries it: a table whose rows each hold a
``text`` caption or a base64 ``image``. Rows are checked and decoded one by one (every error names its
row), then embedded in two batches. The logged pyfunc and ``mpe serve`` both call :func:`embed_rows`, so
the two servers answer the same request with the same numbers and the same messages."""

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

COLUMNS = ("text", "image")
MAX_CAPTION_CHARS = ServeConfig().max_caption_chars
MAX_ERRORS_SHOWN = 5
# The towers see image_size pixels a side; a bigger picture only costs memory to decode (a small PNG can
# hold a huge blank canvas), so its header is checked before its pixels are read.
MAX_IMAGE_PIXELS = 4096 * 4096


def _absent(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _decode_image(row: int, raw) -> Image.Image:
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
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise DataError(
                    f"row {row}: 'image' is {im.width}×{im.height} pixels, over the limit of "
                    f"{MAX_IMAGE_PIXELS} (4096×4096); downscale it first"
                )
            im.load()
            return im.convert("RGB")
    except UnidentifiedImageError:
        raise DataError(
            f"row {row}: 'image' is valid base64 but not an image ({len(data)} bytes in no format PIL reads)"
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # truncated, too large
        raise DataError(
            f"row {row}: 'image' is valid base64 but not an image PIL can read ({len(data)} bytes: {err})"
        ) from None


def decode_rows(
    df: pd.DataFrame, max_caption_chars: int = MAX_CAPTION_CHARS
) -> tuple[list[int], list[str], list[int], list[Image.Image]]:
    """``(text_rows, texts, image_rows, images)`` of a request table; a :class:`DataError` naming every
    bad row (the first few) when a row holds neither or both fields, a caption longer than
    ``max_caption_chars``, or an image that is not base64 of a readable picture."""
    if df.columns.duplicated().any():
        raise DataError(f"columns {list(map(str, df.columns))}: a column is named twice")
    unknown = [c for c in df.columns if c not in COLUMNS]
    if unknown or not any(c in df.columns for c in COLUMNS):
        raise DataError(
            f"columns {list(map(str, df.columns))}: expected 'text' and/or 'image'"
            + (f" (unknown: {', '.join(map(repr, unknown))})" if unknown else "")
        )
    n = len(df)
    texts_col = df["text"].tolist() if "text" in df else [None] * n
    images_col = df["image"].tolist() if "image" in df else [None] * n
    text_rows, texts, image_rows, images, errors = [], [], [], [], []
    for i, (t, im) in enumerate(zip(texts_col, images_col)):
        try:
            has_text, has_image = not _absent(t), not _absent(im)
            if has_text and has_image:
                raise DataError(f"row {i}: has both 'text' and 'image'; send one per row")
            if not has_text and not has_image:
                raise DataError(f"row {i}: has neither a 'text' string nor an 'image' (base64)")
            if has_text:
                if not isinstance(t, str):
                    raise DataError(f"row {i}: 'text' must be a string, not {type(t).__name__}")
                if not t.strip():
                    raise DataError(f"row {i}: 'text' is blank")
                if len(t) > max_caption_chars:
                    raise DataError(
                        f"row {i}: 'text' has {len(t)} characters, over the limit of "
                        f"{max_caption_chars} (the model reads a caption's first tokens only)"
                    )
                text_rows.append(i)
                texts.append(t)
            else:
                images.append(_decode_image(i, im))
                image_rows.append(i)
        except DataError as err:
            errors.append(str(err))
    if errors:
        more = f"; and {len(errors) - MAX_ERRORS_SHOWN} more bad rows" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise DataError("; ".join(errors[:MAX_ERRORS_SHOWN]) + more)
    return text_rows, texts, image_rows, images


@torch.no_grad()
def embed_rows(model, df: pd.DataFrame, max_caption_chars: int = MAX_CAPTION_CHARS) -> np.ndarray:
    """``(rows, embed_dim)`` float32 L2-normalised embeddings, row ``i`` for the request's row ``i``."""
    text_rows, texts, image_rows, images = decode_rows(df, max_caption_chars)
    out = np.zeros((len(df), model.cfg.embed_dim), dtype=np.float32)
    if texts:
        out[text_rows] = model.encode_text(texts).float().cpu().numpy()
    if images:
        out[image_rows] = model.encode_image(images).float().cpu().numpy()
    return out
