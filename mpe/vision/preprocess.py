"""Image preprocessing with PIL and numpy only (no torchvision): RGB, resize the short side, centre
crop to ``uint8`` pixels; then, on the whole batch, scale to [-1, 1] (SigLIP's mean = std = 0.5).

The two halves are separate so that data-loader processes send compact ``uint8`` batches and the
training process scales them in one vectorised step; ``preprocess`` is both halves for one image.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_uint8(image: Image.Image, size: int) -> torch.Tensor:
    """One PIL image to ``(3, size, size)`` uint8: RGB, short side resized to ``size``, centre crop."""
    img = image.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    if (left, top, nw, nh) != (0, 0, size, size):
        img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def scale_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """``uint8`` pixels (any leading shape) to float in [-1, 1]."""
    return (pixels.float() / 255.0 - 0.5) / 0.5


def preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """One PIL image to a ``(3, size, size)`` float tensor."""
    return scale_pixels(to_uint8(image, size))


def preprocess_batch(images: list[Image.Image], size: int) -> torch.Tensor:
    """A list of PIL images to ``(N, 3, size, size)``."""
    return scale_pixels(torch.stack([to_uint8(im, size) for im in images]))
