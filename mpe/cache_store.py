"""The hidden-state cache: the frozen trunk's output for every unique caption, stored once.

Layout of ``<root>/<key>/``::

    manifest.json            the key's fields (what changes the states) and the layout
    part-00000.safetensors   "states": (rows, H) half precision, captions back to back
    part-00000.json          [{"sha": caption sha256, "offset": row, "rows": n, "caption_len": c}, …]

Each part is written to a temp file and renamed; a part's index is renamed after its states, so a
killed run leaves only whole parts, and the next run computes just the captions no part holds.
The key covers the base model's content, tokenizer, templates, K, negation, caption length, storage
dtype, ``n_top`` and the pooling: a different config is a different folder, never a silent reuse.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mpe.atomic import atomic_path, write_text
from mpe.config import TextConfig
from mpe.errors import CacheMismatch, StageInputError
from mpe.hashing import fingerprint, text_sha256 as caption_sha
from mpe.precision import torch_dtype
from mpe.text.prompt_sequence import PromptLayout

FORMAT_VERSION = 1


def key_fields(model_hash: str, layout: PromptLayout, text: TextConfig, storage_dtype: str, n_layers: int) -> dict:
    """Everything that changes the stored states; its hash names the cache folder."""
    return {"format": FORMAT_VERSION, "model_sha256": model_hash, "pooling": text.pooling,
            "num_prompts": text.num_prompts, "negation": text.negation,
            "prompt_template": text.prompt_template, "negated_template": text.negated_template,
            "fixed_prompt": text.fixed_prompt, "max_caption_tokens": text.max_caption_tokens,
            "n_top": text.n_top, "trunk_layers": n_layers - text.n_top,
            "segments": [list(s) for s in layout.segments], "dtype": storage_dtype}


def cache_key(fields: dict) -> str:
    return fingerprint(fields, 20)


@dataclass
class Entry:
    part: int
    offset: int
    rows: int
    caption_len: int


class HiddenStateCache:
    """Read/write access to one cache folder."""

    def __init__(self, folder: Path, fields: dict, create: bool = True):
        self.folder = Path(folder)
        self.fields = fields
        self.index: dict[str, Entry] = {}
        self._handles: dict[int, object] = {}
        self._check_manifest(create)
        self._load_index()

    @classmethod
    def for_config(cls, root: str | Path, fields: dict, create: bool = True) -> "HiddenStateCache":
        """The folder for ``fields`` under ``root``; with ``create=False`` a missing one is an error."""
        return cls(Path(root) / cache_key(fields), fields, create)

    def _check_manifest(self, create: bool) -> None:
        manifest = self.folder / "manifest.json"
        if not manifest.exists() and not create:
            raise StageInputError(f"{self.folder}: no cache for this configuration; run `mpe cache` first")
        if manifest.exists():
            written = json.loads(manifest.read_text())
            if written != self.fields:
                diff = sorted(k for k in set(written) | set(self.fields) if written.get(k) != self.fields.get(k))
                raise CacheMismatch(f"{self.folder} was written for another configuration (differs in: "
                                    f"{', '.join(diff)}); use a fresh folder or the matching params")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_text(manifest, json.dumps(self.fields, indent=1, sort_keys=True))

    def _load_index(self) -> None:
        for idx_file in sorted(self.folder.glob("part-*.json")):
            part = int(idx_file.stem.split("-")[1])
            if not (self.folder / f"part-{part:05d}.safetensors").exists():
                continue
            for e in json.loads(idx_file.read_text()):
                self.index[e["sha"]] = Entry(part, e["offset"], e["rows"], e["caption_len"])

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch_dtype(self.fields["dtype"])

    def __contains__(self, text: str) -> bool:
        return caption_sha(text) in self.index

    def __len__(self) -> int:
        return len(self.index)

    def missing(self, texts) -> list[str]:
        seen, out = set(), []
        for t in texts:
            if t not in seen and caption_sha(t) not in self.index:
                seen.add(t)
                out.append(t)
        return out

    def _next_part(self) -> int:
        parts = [int(p.stem.split("-")[1]) for p in self.folder.glob("part-*.safetensors")]
        return max(parts, default=-1) + 1

    def write_part(self, texts: list[str], states: list[torch.Tensor], caption_lens: list[int]) -> int:
        """Store one part: ``states[i]`` is ``(rows_i, H)`` for ``texts[i]``. Atomic."""
        part = self._next_part()
        dtype = self.storage_dtype
        flat = torch.cat(states).to(dtype)
        if dtype == torch.float16 and not torch.isfinite(flat).all():
            raise OverflowError("hidden states overflow float16; set cache.dtype: bfloat16")
        entries, offset = [], 0
        for t, s, c in zip(texts, states, caption_lens):
            entries.append({"sha": caption_sha(t), "offset": offset, "rows": int(s.shape[0]), "caption_len": int(c)})
            offset += int(s.shape[0])
        with atomic_path(self.folder / f"part-{part:05d}.safetensors", suffix=".safetensors") as tmp:
            save_file({"states": flat.contiguous()}, str(tmp))
        write_text(self.folder / f"part-{part:05d}.json", json.dumps(entries))
        for e in entries:
            self.index[e["sha"]] = Entry(part, e["offset"], e["rows"], e["caption_len"])
        return part

    def get(self, text: str) -> tuple[torch.Tensor, int]:
        """``(rows, H)`` stored states and the caption length for ``text``."""
        try:
            e = self.index[caption_sha(text)]
        except KeyError:
            raise KeyError(f"caption not in cache {self.folder}: {text[:80]!r}") from None
        h = self._handles.get(e.part)
        if h is None:
            h = self._handles[e.part] = safe_open(str(self.folder / f"part-{e.part:05d}.safetensors"), "pt")
        return h.get_slice("states")[e.offset:e.offset + e.rows], e.caption_len

    def batch(self, texts: list[str], dtype=torch.float32) -> tuple[torch.Tensor, list[int]]:
        """Left-padded ``(B, T, H)`` states (in ``dtype``) and caption lengths, ready for the top."""
        got = [self.get(t) for t in texts]
        states = torch.nn.utils.rnn.pad_sequence([g[0].to(dtype) for g in got], batch_first=True,
                                                 padding_side="left")
        return states, [g[1] for g in got]
