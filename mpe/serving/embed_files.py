"""Embedding files of text or images with a saved model (``mpe embed``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from mpe.errors import DataError
from mpe.files.atomic import atomic_path
from mpe.model.vision.preprocess import ImageTransform
from mpe.serving.request import check_image_size

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


def read_text_file(path: str | Path) -> tuple[list[str], list[int]]:
    """The captions of a UTF-8 file, one per line, and the (1-based) numbers of the blank lines skipped.
    Undecodable bytes and a file without any caption are errors naming the file (and line)."""
    path = Path(path)
    texts, blank = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}: line {n} is not UTF-8 text ({err.reason} at byte {err.start}); "
                    "re-encode the file as UTF-8"
                ) from None
            if line.strip():
                texts.append(line)
            else:
                blank.append(n)
    if not texts:
        raise DataError(f"{path}: no caption to embed (every line is blank)")
    return texts, blank


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def image_input(path: Path, transform: ImageTransform) -> torch.Tensor:
    """One image file as the tower's ``(3, size, size)`` uint8 input, its size checked from the header and
    the picture shrunk as soon as it is decoded (a batch holds no full-size image)."""
    try:
        with Image.open(path) as im:
            check_image_size(str(path), im.width, im.height, transform)
            im.load()
            return transform.to_uint8(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from None


@torch.no_grad()
def embed_texts(model, texts: list[str], batch_size: int = 32) -> np.ndarray:
    out = [
        model.encode_text(texts[i : i + batch_size]).float().cpu().numpy()
        for i in tqdm(range(0, len(texts), batch_size), desc="embed text", unit="batch")
    ]
    return np.concatenate(out)


@torch.no_grad()
def embed_image_files(model, files: list[Path], batch_size: int = 32) -> np.ndarray:
    out = []
    for i in tqdm(range(0, len(files), batch_size), desc="embed images", unit="batch"):
        pixels = torch.stack([image_input(p, model.image_transform) for p in files[i : i + batch_size]])
        out.append(model.encode_pixels(pixels).float().cpu().numpy())
    return np.concatenate(out)


def save_npy(target: str | Path, array: np.ndarray) -> None:
    with atomic_path(target, suffix=".npy") as tmp:
        np.save(tmp, array)


def embed_files(
    model_dir: str | Path,
    out: str | Path,
    text_file: str | None = None,
    image_dir: str | None = None,
    batch_size: int = 32,
) -> str:
    """Embed a text file (one caption per line) or a folder of images with the model in ``model_dir`` into
    ``out`` (``.npy``, one row per caption or image); returns what was written, in one line."""
    from mpe.model.multi_prompt_clip import MultiPromptCLIP

    blank: list[int] = []
    if text_file:
        texts, blank = read_text_file(text_file)
    else:
        images = list_images(image_dir)
    model = MultiPromptCLIP.from_pretrained(model_dir)
    arr = embed_texts(model, texts, batch_size) if text_file else embed_image_files(model, images, batch_size)
    save_npy(out, arr)
    skipped = f"; skipped {len(blank)} blank lines ({', '.join(map(str, blank[:10]))})" if blank else ""
    return f"wrote {arr.shape[0]} embeddings of dimension {arr.shape[1]} to {out}{skipped}"
