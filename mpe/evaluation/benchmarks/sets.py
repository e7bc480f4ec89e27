"""What a benchmark reader returns: a retrieval set, a classification set, a multiple-choice set, a set of
caption / negative-caption pairs or a Winoground set, over images that are decoded only when embedded (a
Karpathy test split is thousands of full-size photos). Each image keeps the file and row it came from, so a
file that does not open is named with its row."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mpe.errors import DataError


@dataclass(frozen=True)
class ImageRef:
    """One image: a file (``path``) or bytes read from an archive (``data``); ``where`` names its row; ``box``
    (left, top, right, bottom) crops it when loaded (ARO's bounding boxes)."""

    where: str
    path: Path | None = None
    data: bytes | None = None
    box: tuple[float, float, float, float] | None = None

    def _source(self):
        return self.path if self.data is None else io.BytesIO(self.data)

    def check(self) -> None:
        """Fail now (before any model loads) if the file is missing or is not an image (header only)."""
        if self.path is not None and not self.path.is_file():
            raise DataError(f"{self.where}: image file not found")
        try:
            with Image.open(self._source()):
                pass
        except (OSError, SyntaxError, ValueError) as err:
            raise DataError(f"{self.where}: image does not open: {err}") from None

    def load(self) -> Image.Image:
        """The decoded RGB image (a truncated file fails here, named)."""
        try:
            with Image.open(self._source()) as im:
                image = im.convert("RGB")
        except (OSError, SyntaxError, ValueError) as err:
            raise DataError(f"{self.where}: image does not open: {err}") from None
        return image if self.box is None else image.crop(self.box)


class Images(Sequence):
    """A list of :class:`ImageRef` that decodes on indexing, so ``embed_images`` holds one batch at a time."""

    def __init__(self, refs: list[ImageRef]):
        self.refs = refs

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [r.load() for r in self.refs[i]]
        return self.refs[i].load()


@dataclass
class RetrievalSet:
    """Images and their captions (several per image): caption ``j`` belongs to image ``caption_image[j]``."""

    images: list[ImageRef]
    captions: list[str]
    caption_image: list[int]

    def add(self, image: ImageRef, captions: list[str]) -> None:
        """One image (checked to open) and its captions."""
        image.check()
        self.caption_image += [len(self.images)] * len(captions)
        self.captions += captions
        self.images.append(image)


@dataclass
class ClassificationSet:
    """Images with a class index each; a class's text is every template filled with its name."""

    images: list[ImageRef]
    labels: list[int]
    classnames: list[str]
    templates: list[str]
    top_k: list[int]


@dataclass
class ChoiceSet:
    """Multiple choice: per image, candidate captions and the index of the correct one (``groups``: the
    question type, e.g. NegBench's ``correct_answer_template``, or None)."""

    images: list[ImageRef]
    choices: list[list[str]]
    answers: list[int]
    groups: list[str | None]


@dataclass
class CaptionPairSet:
    """Per item an image, its caption and a negative caption: is the caption scored higher (SugarCrepe, ARO)?
    ``groups`` holds each item's category (SugarCrepe's file, ARO's relation or attribute pair). With
    ``per_group`` each group's accuracy is a metric (SugarCrepe); otherwise the accuracy and the macro accuracy
    over the groups with at least ``min_group_count`` items and not in ``exclude_groups`` (ARO)."""

    images: list[ImageRef]
    captions: list[str]
    negatives: list[str]
    groups: list[str]
    per_group: bool = True
    min_group_count: int = 0
    exclude_groups: tuple[str, ...] = ()


@dataclass
class WinogroundSet:
    """Groups of two images and two captions, caption ``i`` belonging to image ``i`` (Winoground)."""

    images: list[tuple[ImageRef, ImageRef]]
    captions: list[tuple[str, str]]


def require(path: Path, layout: str, folder: bool = False) -> Path:
    """``path`` itself, or a :class:`DataError` naming it and the layout expected there."""
    ok = path.is_dir() if folder else path.is_file()
    if not ok:
        what = "folder" if folder else "file"
        found = " (it is a file)" if folder and path.is_file() else " (it is a folder)" if path.is_dir() else ""
        raise DataError(f"{path}: benchmark {what} not found{found}; expected {layout}")
    return path
