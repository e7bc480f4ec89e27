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

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from mpe.atomic import atomic_path, write_text
from mpe.text.prompt_sequence import PromptLayout

FORMAT_VERSION = 1
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class CacheMismatch(RuntimeError):
    """A cache folder was written for a different configuration."""


def caption_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_content_hash(model_dir: Path) -> str:
    """sha256 over the weights and tokenizer files of a checkpoint folder (names and contents)."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(model_dir).iterdir()
                   if p.suffix in (".safetensors", ".json") and p.name not in ("mpe_source.json",))
    for p in files:
        h.update(p.name.encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()


def key_fields(model_hash: str, layout: PromptLayout, tower_cfg, storage_dtype: str, n_layers: int) -> dict:
    return {"format": FORMAT_VERSION, "model_sha256": model_hash, "pooling": tower_cfg.pooling,
            "num_prompts": tower_cfg.num_prompts, "negation": tower_cfg.negation,
            "prompt_template": tower_cfg.prompt_template, "negated_template": tower_cfg.negated_template,
            "fixed_prompt": tower_cfg.fixed_prompt, "max_caption_tokens": tower_cfg.max_caption_tokens,
            "n_top": tower_cfg.n_top, "trunk_layers": n_layers - tower_cfg.n_top,
            "segments": [list(s) for s in layout.segments], "dtype": storage_dtype}


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class Entry:
    part: int
    offset: int
    rows: int
    caption_len: int


class HiddenStateCache:
    """Read/write access to one cache folder."""

    def __init__(self, folder: Path, fields: dict):
        self.folder = Path(folder)
        self.fields = fields
        self.index: dict[str, Entry] = {}
        self._handles: dict[int, object] = {}
        self._check_manifest()
        self._load_index()

    @classmethod
    def for_config(cls, root: str | Path, fields: dict) -> "HiddenStateCache":
        return cls(Path(root) / cache_key(fields), fields)

    def _check_manifest(self) -> None:
        manifest = self.folder / "manifest.json"
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
        return DTYPES[self.fields["dtype"]]

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


@torch.no_grad()
def fill_cache(cache: HiddenStateCache, tower, texts: list[str], batch_size: int = 32,
               part_size: int = 256, autocast_dtype: torch.dtype | None = None) -> int:
    """Run the trunk over every text the cache lacks; returns how many were computed."""
    todo = cache.missing(texts)
    if not todo:
        return 0
    tower.eval()
    seg_len = tower.layout.segments_len
    bar = tqdm(total=len(todo), desc="cache trunk states", unit="caption")
    for p0 in range(0, len(todo), part_size):
        chunk = todo[p0:p0 + part_size]
        states, lens = [], []
        for b0 in range(0, len(chunk), batch_size):
            texts_b = chunk[b0:b0 + batch_size]
            batch = tower.tokenize(texts_b)
            device_type = batch.segment_ids.device.type
            with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                h = tower.trunk(batch)
            for i, c in enumerate(batch.caption_lens.tolist()):
                states.append(h[i, -(c + seg_len):].float().cpu())
                lens.append(c)
            bar.update(len(texts_b))
        cache.write_part(chunk, states, lens)
    bar.close()
    return len(todo)


def cache_fields_for(params, tower, base_dir: Path) -> dict:
    return key_fields(model_content_hash(base_dir), tower.layout, params.model.text, params.cache.dtype,
                      tower.decoder.num_layers)


def open_cache(params, tower, base_dir: Path) -> HiddenStateCache:
    """The cache folder for this configuration (created empty if new)."""
    return HiddenStateCache.for_config(params.cache.root, cache_fields_for(params, tower, base_dir))


def load_text_tower(params, base_dir: Path, device: str = "cpu"):
    """The LLM text tower on the saved base model (projections untrained; only the trunk is used)."""
    from mpe.base_model import load_base_model
    from mpe.text.tower import LLMTextTower

    lm, tok = load_base_model(base_dir, params.model.text.attn_implementation, torch.float32,
                              params.base_model.trust_remote_code)
    return LLMTextTower(lm, tok, params.model.text, params.model.embed_dim).to(device).eval()


def texts_to_cache(params) -> list[str]:
    """Unique texts the pipeline will need: training captions, then every evaluation text."""
    from mpe.data.loader import split_captions
    from mpe.evaluate import evaluation_texts

    root = Path(params.data.out_dir) / "shards"
    texts = split_captions(root / "train")
    texts += evaluation_texts(params)
    return list(dict.fromkeys(texts))


def _autocast(params, device: str):
    mode = params.cache.autocast
    if mode == "bfloat16" or (mode == "auto" and device == "cuda"):
        return torch.bfloat16
    return None


def run_cache_stage(params) -> dict:
    """The ``cache`` stage: trunk states for every unique text, resumable; returns a summary."""
    base_dir = Path(params.base_model.out_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tower = load_text_tower(params, base_dir, device)
    cache = open_cache(params, tower, base_dir)
    texts = texts_to_cache(params)
    before = len(cache)
    if params.cache.engine == "ray":
        computed = fill_cache_with_ray(cache, params, base_dir, texts)
    else:
        computed = fill_cache(cache, tower, texts, params.cache.batch_size, params.cache.part_size,
                              _autocast(params, device))
    summary = {"folder": str(cache.folder), "key": cache.folder.name, "texts": len(texts),
               "already_cached": before, "computed": computed, "entries": len(cache)}
    write_text(Path(params.cache.root) / "summary.json", json.dumps(summary, indent=1))
    return summary


class _TrunkActor:
    """Ray Data actor: loads the trunk once, maps batches of texts to their trunk states."""

    def __init__(self, params_json: str, base_dir: str):
        from mpe.config import Params

        self.params = Params.model_validate_json(params_json)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tower = load_text_tower(self.params, Path(base_dir), self.device)
        self.autocast = _autocast(self.params, self.device)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        texts = list(batch["text"])
        b = self.tower.tokenize(texts)
        seg_len = self.tower.layout.segments_len
        with torch.no_grad(), torch.autocast(self.device, dtype=self.autocast, enabled=self.autocast is not None):
            h = self.tower.trunk(b)
        lens = b.caption_lens.tolist()
        states = [h[i, -(c + seg_len):].float().cpu().numpy() for i, c in enumerate(lens)]
        out = np.empty(len(states), dtype=object)
        out[:] = states
        return {"text": np.array(texts, dtype=object), "states": out, "caption_len": np.array(lens)}


def fill_cache_with_ray(cache: HiddenStateCache, params, base_dir: Path, texts: list[str]) -> int:
    """Compute the missing states with Ray Data ``map_batches`` on actors (GPU actors at scale);
    the driver writes the parts, so the folder stays resumable."""
    import ray

    from mpe.ray_cluster import ensure_ray

    todo = cache.missing(texts)
    if not todo:
        return 0
    ensure_ray(params.ray)
    ds = ray.data.from_items([{"text": t} for t in todo]).map_batches(
        _TrunkActor, fn_constructor_kwargs={"params_json": params.model_dump_json(), "base_dir": str(base_dir)},
        batch_size=params.cache.batch_size, concurrency=params.cache.ray_actors,
        num_gpus=params.cache.gpus_per_actor or None, batch_format="numpy")
    bar = tqdm(total=len(todo), desc="cache trunk states (ray)", unit="caption")
    for batch in ds.iter_batches(batch_size=params.cache.part_size, batch_format="numpy"):
        states = [torch.from_numpy(s) for s in batch["states"]]
        cache.write_part(list(batch["text"]), states, [int(c) for c in batch["caption_len"]])
        bar.update(len(states))
    bar.close()
    return len(todo)
