"""Image preprocessing with PIL and numpy only (no torchvision): RGB, resize, centre crop to ``uint8``
pixels; then, on the whole batch, rescale and normalise per channel.

The two halves are separate so that data-loader processes send compact ``uint8`` batches and the
training process scales them in one vectorised step. An :class:`ImageTransform` holds both halves'
settings: mpe's own tower (short side to ``image_size``, centre crop, SigLIP's mean = std = 0.5), or
those a pretrained checkpoint's processor config names, applied the way the Hugging Face PIL image
processor applies them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class ImageTransform:
    """How an image becomes a tower's input: ``(3, size, size)``, JSON-able (the loader gets it as a dict).

    ``short_side`` set: resize the short side to it (the long side in proportion, truncated), then centre
    crop ``size`` x ``size``. ``short_side`` None: resize both sides to ``size`` (no crop).
    """

    size: int
    short_side: int | None
    resample: int = int(Image.Resampling.BICUBIC)
    rescale: float = 1 / 255
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def own(cls, size: int) -> ImageTransform:
        """mpe's from-scratch tower."""
        return cls(size=size, short_side=size)

    @classmethod
    def from_json(cls, d: dict) -> ImageTransform:
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})

    def to_json(self) -> dict:
        return asdict(self)

    def resized_size(self, w: int, h: int) -> tuple[int, int]:
        """The size a ``w`` x ``h`` image is resized to before the centre crop (a long thin picture stays long:
        its resized size is what decoding it costs, not ``size``²)."""
        if self.short_side is None:
            return self.size, self.size
        if w <= h:
            return self.short_side, int(self.short_side * h / w)
        return int(self.short_side * w / h), self.short_side

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        """One PIL image to ``(3, size, size)`` uint8."""
        img = image.convert("RGB")
        w, h = img.size
        target = self.resized_size(w, h)
        if target != (w, h):
            img = img.resize(target, Image.Resampling(self.resample))
        nw, nh = target
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        if (left, top, nw, nh) != (0, 0, self.size, self.size):
            img = img.crop((left, top, left + self.size, top + self.size))
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``uint8`` pixels ``(..., 3, H, W)`` to the tower's float input."""
        mean = torch.tensor(self.mean, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(3, 1, 1)
        return (pixels.float() * self.rescale - mean) / std

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """A list of PIL images to ``(N, 3, size, size)``."""
        return self.normalize(torch.stack([self.to_uint8(im) for im in images]))
