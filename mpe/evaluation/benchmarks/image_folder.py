"""Zero-shot classification from an image folder per class (torchvision's ImageFolder layout:
``<root>/<class>/**/*.jpg``, classes in sorted folder order), with class names from the folder names or
a classnames file, and CLIP prompt templates (``{c}`` is the class name)."""

from __future__ import annotations

import json
from pathlib import Path

from mpe.config import ImageFolderBenchmark
from mpe.errors import DataError
from mpe.evaluation.benchmarks.sets import ClassificationSet, ImageRef, require

# torchvision's IMG_EXTENSIONS, compared case-insensitively as it does
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LAYOUT = "one folder per class: <path>/<class>/<image>.jpg (ImageFolder layout)"


def class_names(folders: list[str], file: Path | None) -> list[str]:
    """Names of the classes: the folder names, or a ``.json`` ``{folder: name}`` / a ``.txt`` of one name per
    line in sorted folder order (CLIP_benchmark's ``classnames.txt``)."""
    if file is None:
        return list(folders)
    require(file, "a .json {folder: name} or a .txt with one class name per line")
    if file.suffix == ".json":
        try:
            mapping = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{file}: not valid JSON: {err}") from None
        if not isinstance(mapping, dict):
            raise DataError(f"{file}: expected an object {{folder: class name}}")
        missing = [f for f in folders if f not in mapping]
        if missing:
            raise DataError(f"{file}: no name for the class folders {missing}")
        return [str(mapping[f]) for f in folders]
    names = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != len(folders):
        raise DataError(
            f"{file}: {len(names)} class names for {len(folders)} class folders (one line per folder, "
            "in sorted folder order)"
        )
    return names


def templates_of(cfg: ImageFolderBenchmark) -> list[str]:
    if cfg.templates_file is None:
        return list(cfg.templates)
    file = require(Path(cfg.templates_file), "one prompt template per line, each with '{c}'")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    for i, t in enumerate(lines):
        if t and "{c}" not in t:
            raise DataError(f"{file}: line {i + 1}: template without '{{c}}' (the class name): {t!r}")
    templates = [t for t in lines if t]
    if not templates:
        raise DataError(f"{file}: no template")
    return templates


def read(cfg: ImageFolderBenchmark) -> ClassificationSet:
    root = require(Path(cfg.path), LAYOUT, folder=True)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(folders) < 2:
        raise DataError(f"{root}: {len(folders)} class folder(s); expected at least two, {LAYOUT}")
    names = class_names(folders, Path(cfg.classnames) if cfg.classnames else None)
    images, labels = [], []
    for label, folder in enumerate(folders):
        files = sorted(p for p in (root / folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{root / folder}: class folder without images ({', '.join(IMAGE_SUFFIXES)})")
        for f in files:
            ref = ImageRef(f"{root}: class '{folder}' ({f})", path=f)
            ref.check()
            images.append(ref)
            labels.append(label)
    return ClassificationSet(images, labels, names, templates_of(cfg), list(cfg.top_k))
