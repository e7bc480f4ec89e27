"""Content hashes: files, checkpoint folders, texts, and short fingerprints of JSON-able objects."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fingerprint(obj, length: int = 16) -> str:
    """A short stable hash of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


# what a model folder's content is: weights, configs, tokenizers (sentencepiece, BPE merges, tiktoken)
MODEL_FILES = (".safetensors", ".json", ".model", ".txt", ".tiktoken")


def checkpoint_sha256(folder: str | Path, suffixes=(".safetensors", ".json"), record=None) -> str:
    """sha256 over the weight and config/tokenizer files of a checkpoint folder (names and contents; hidden
    files are not content). With ``record`` (the folder's :class:`mpe.files.verified.Record`), a file
    whose stat signature is the one it was hashed at is not read again."""
    h = hashlib.sha256()
    for p in sorted(p for p in Path(folder).iterdir() if p.suffix in suffixes and not p.name.startswith(".")):
        h.update(p.name.encode())
        h.update(_digest(p, record).encode())
    return h.hexdigest()


def _digest(path: Path, record) -> str:
    if record is None:
        return file_sha256(path)
    from mpe.files.verified import signature

    digest = record.digest_of(str(path))
    if digest is None:
        before = signature(str(path))
        digest = file_sha256(path)
        record.add(str(path), digest, before)
    return digest


def model_folder_sha256(folder: str | Path) -> str:
    """sha256 of a model folder a stage reads from outside the project (a local base LLM, a pretrained
    vision tower): every weight, config and tokenizer file, by name and content. The folder's record of
    what was hashed (when it can be written there) spares reading unchanged files at every run."""
    from mpe.files.verified import Record

    record = Record(str(folder))
    digest = checkpoint_sha256(folder, MODEL_FILES, record)
    record.save()
    return digest
