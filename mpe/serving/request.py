"""One embedding request as MLflow's scoring protocol carries it: a table whose rows each hold a
``text`` caption, a base64 ``image`` or a base64 ``video`` (an mp4, webm …: the whole file's bytes). Rows
are checked and decoded one by one (every error names its row), then embedded in one batch per kind.

A video travels as base64 in the row, not as a path on the server: the request is then self-contained
(the same for ``mpe serve``, the pyfunc under ``mlflow models serve`` and ``predict`` in a notebook, on
any host), and the server never opens a file a client names — no allowed-folder setting to get wrong, no
path traversal. The cost is size: a clip must fit in the body limit (``serve.max_body_mb``), as the
short clips retrieval works on do (a 10 s MSR-VTT clip is ~1 MB). The logged pyfunc and ``mpe serve`` both
call :func:`embed_rows`, so the two servers answer the same request with the same numbers and the same messages."""

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

COLUMNS = ("text", "image", "video")
MAX_CAPTION_CHARS = ServeConfig().max_caption_chars
MAX_ERRORS_SHOWN = 5
# The towers see image_size pixels a side; a bigger picture only costs memory to decode (a small PNG can
# hold a huge blank canvas), so its header is checked before its pixels are read.
MAX_IMAGE_PIXELS = 4096 * 4096
# A clip is decoded whole to sample its frames: bound the work one row can ask for (100 s at 30 fps).
MAX_VIDEO_FRAMES = 3000


def _absent(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


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


def _decode_image(row: int, raw) -> Image.Image:
    data = _bytes_of(row, "image", raw)
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


class Rows(NamedTuple):
    """A request's rows by kind: the row numbers and the decoded values of each."""

    text_rows: list[int]
    texts: list[str]
    image_rows: list[int]
    images: list[Image.Image]
    video_rows: list[int]
    videos: list[list[Image.Image]]


def decode_rows(df: pd.DataFrame, max_caption_chars: int = MAX_CAPTION_CHARS, num_frames: int = 8) -> Rows:
    """The rows of a request table by kind (a video as ``num_frames`` frames); a :class:`DataError` naming
    every bad row (the first few) when a row holds no field or more than one, a caption longer than
    ``max_caption_chars``, an image that is not base64 of a readable picture, or a video that is not base64
    of a clip that decodes."""
    if df.columns.duplicated().any():
        raise DataError(f"columns {list(map(str, df.columns))}: a column is named twice")
    unknown = [c for c in df.columns if c not in COLUMNS]
    if unknown or not any(c in df.columns for c in COLUMNS):
        raise DataError(
            f"columns {list(map(str, df.columns))}: expected 'text', 'image' and/or 'video'"
            + (f" (unknown: {', '.join(map(repr, unknown))})" if unknown else "")
        )
    n = len(df)
    texts_col, images_col, videos_col = (df[c].tolist() if c in df else [None] * n for c in COLUMNS)
    out, errors = Rows([], [], [], [], [], []), []
    text_rows, texts, image_rows, images = out.text_rows, out.texts, out.image_rows, out.images
    for i, (t, im, vid) in enumerate(zip(texts_col, images_col, videos_col)):
        try:
            has_text, has_image, has_video = not _absent(t), not _absent(im), not _absent(vid)
            given = [c for c, has in zip(COLUMNS, (has_text, has_image, has_video)) if has]
            if len(given) > 1:
                raise DataError(f"row {i}: has {' and '.join(map(repr, given))}; send one per row")
            if not given:
                raise DataError(f"row {i}: has neither a 'text' string nor an 'image' or 'video' (base64)")
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
            elif has_image:
                images.append(_decode_image(i, im))
                image_rows.append(i)
            else:
                out.videos.append(_decode_video(i, vid, num_frames))
                out.video_rows.append(i)
        except DataError as err:
            errors.append(str(err))
    if errors:
        more = f"; and {len(errors) - MAX_ERRORS_SHOWN} more bad rows" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise DataError("; ".join(errors[:MAX_ERRORS_SHOWN]) + more)
    return out


@torch.no_grad()
def embed_rows(model, df: pd.DataFrame, max_caption_chars: int = MAX_CAPTION_CHARS) -> np.ndarray:
    """``(rows, embed_dim)`` float32 L2-normalised embeddings, row ``i`` for the request's row ``i``."""
    rows = decode_rows(df, max_caption_chars, model.cfg.video.num_frames)
    out = np.zeros((len(df), model.cfg.embed_dim), dtype=np.float32)
    if rows.texts:
        out[rows.text_rows] = model.encode_text(rows.texts).float().cpu().numpy()
    if rows.images:
        out[rows.image_rows] = model.encode_image(rows.images).float().cpu().numpy()
    if rows.videos:
        out[rows.video_rows] = model.encode_video(rows.videos).float().cpu().numpy()
    return out
