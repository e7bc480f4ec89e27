"""A synthetic webdataset corpus of any size, written straight to shards (no download): what the tests
and the data-scale benchmark stream when they measure the data path rather than the images."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

from mpe.data.shapes import COLOURS, SHAPES

_WORDS = ["small", "large", "bright", "dark", "striped", "dotted", "plain", "round"]


def _images(n: int, size: int, fmt: str, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        d = ImageDraw.Draw(im)
        for _ in range(3):
            x, y, r = rng.randrange(size), rng.randrange(size), rng.randrange(2, max(3, size // 4))
            d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randrange(256) for _ in range(3)))
        buf = io.BytesIO()
        im.save(buf, format="PNG" if fmt == "png" else "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def caption_for(i: int, unique: bool) -> str:
    colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
    word = _WORDS[(i // 48) % len(_WORDS)]
    tail = f" number {i}" if unique else ""
    return f"a {word} {colour} {shape}{tail}"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def write_corpus(
    folder: str | Path,
    n_samples: int,
    per_shard: int,
    image_size: int = 64,
    fmt: str = "png",
    unique_captions: bool = True,
    seed: int = 0,
    distinct_images: int = 256,
    empty_caption_every: int = 0,
    corrupt_image_every: int = 0,
    captions_repeat: int = 1,
) -> list[Path]:
    """Shards ``00000.tar, …`` of ``n_samples`` samples (``.png``/``.jpg`` + ``.txt``), keys in order;
    each caption on ``captions_repeat`` consecutive samples; optionally every k-th caption empty or image
    corrupt. Returns the shard paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pool = _images(distinct_images, image_size, fmt, seed)
    ext = "png" if fmt == "png" else "jpg"
    shards = []
    for s, start in enumerate(range(0, n_samples, per_shard)):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(n_samples, start + per_shard)):
                key = f"{s:05d}{i - start:06d}"
                image = pool[i % len(pool)]
                if corrupt_image_every and i % corrupt_image_every == corrupt_image_every - 1:
                    image = b"not an image"
                caption = caption_for(i // captions_repeat, unique_captions)
                if empty_caption_every and i % empty_caption_every == empty_caption_every - 1:
                    caption = ""
                _add(tar, f"{key}.{ext}", image)
                _add(tar, f"{key}.txt", caption.encode())
        shards.append(path)
    return shards
