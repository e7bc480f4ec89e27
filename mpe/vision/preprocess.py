"""Image preprocessing with PIL and numpy only (no torchvision): RGB, resize the short side,
centre crop, scale to [-1, 1] (SigLIP's mean = std = 0.5)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """One PIL image to a ``(3, size, size)`` float tensor."""
    img = image.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy((arr - 0.5) / 0.5).permute(2, 0, 1).contiguous()


def preprocess_batch(images: list[Image.Image], size: int) -> torch.Tensor:
    """A list of PIL images to ``(N, 3, size, size)``."""
    return torch.stack([preprocess(im, size) for im in images])
