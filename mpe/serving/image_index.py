"""The search index: a trained model's embeddings of the data stage's images in a FAISS index, with what a
result shows (caption, original URL, where its image lies in its shard) and the identity of the model it
came from, so an index is never queried with another model's text embeddings.

The index type follows the collection's size, as autofaiss chooses it: exact inner product (``Flat``) up
to ``search.exact_max`` images, above it IVF-PQ with about 4·√n lists and one byte per 4 dimensions. Scores
of the images returned are recomputed exactly from the stored embeddings and split into one part per
adaptive prompt: the parts ``⟨t_k, v_k⟩`` sum to the cosine similarity, and the largest says which prompt
matched the image.

Folder::

    index.json       the model's identity, the index key, counts, where the images are
    index.faiss      the FAISS index (inner product over L2-normalised embeddings)
    embeddings.npy   float16, one row per item (exact scores and per-prompt parts)
    items.parquet    split, shard, key, caption, url, offset and size of the image inside its shard
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mpe import __version__
from mpe.config import SearchConfig
from mpe.data.tar_stream import IMAGE_EXTS, split_name
from mpe.errors import ConfigError, StageInputError
from mpe.files import storage
from mpe.files.atomic import atomic_dir
from mpe.files.hashing import file_sha256

META_FILE = "index.json"
INDEX_FILE = "index.faiss"
EMBEDDINGS_FILE = "embeddings.npy"
ITEMS_FILE = "items.parquet"
MIME = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


def model_sha256(model_dir: str | Path) -> str:
    """The identity of a saved model: its weights and configs, the text model's included (README and other
    files left out, so a model card does not change it)."""

    root = Path(model_dir)
    h = hashlib.sha256()
    for p in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()


def auto_index_key(n: int, dim: int, exact_max: int) -> str:
    """``Flat`` (exact) up to ``exact_max`` vectors; above, ``IVF<lists>,PQ<m>x8``: lists a power of two near
    4·√n with at least 39 training vectors each, ``m`` sub-quantizers of 4 dimensions (or the nearest
    divisor of ``dim`` below ``dim/4``)."""
    if n <= exact_max:
        return "Flat"
    lists = 2 ** round(math.log2(4 * math.sqrt(n)))
    lists = max(1, min(lists, 2 ** int(math.log2(max(n // 39, 1))), 1 << 16))
    m = next(m for m in range(max(dim // 4, 1), 0, -1) if dim % m == 0)
    return f"IVF{lists},PQ{m}x8"


@dataclass(frozen=True)
class Item:
    """One indexed image: where it lies and what it shows."""

    split: str
    shard: str  # relative to the data root: shards/<split>/<name>.tar
    key: str
    caption: str
    url: str
    ext: str
    offset: int
    size: int


def _shard_items(split: str, shard_url: str, skipped: Counter) -> Iterator[tuple[Item, bytes]]:
    """Every sample of a shard with an image and a caption, with the image member's offset in the tar."""
    rel = f"shards/{split}/{storage.name(shard_url)}"

    def emit(key, members):
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        caption = members.get("txt", (None, b""))[1].decode("utf-8", errors="replace").strip()
        if ext is None or not caption:
            skipped["no_image_or_caption"] += 1
            return None
        meta = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"][1])
            except ValueError:
                meta = {}
        info, data = members[ext]
        url = meta.get("url") if isinstance(meta, dict) and isinstance(meta.get("url"), str) else ""
        return Item(split, rel, key, caption, url, ext, info.offset_data, info.size), data

    with storage.open_read(shard_url) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        key, members = None, {}
        for m in tar:
            if not m.isfile():
                continue
            k, ext = split_name(m.name)
            if k != key:
                if key is not None and (got := emit(key, members)):
                    yield got
                key, members = k, {}
            if ext in IMAGE_EXTS or ext in ("txt", "json"):
                members[ext] = (m, tar.extractfile(m).read())
        if key is not None and (got := emit(key, members)):
            yield got


def _decode(data: bytes) -> Image.Image | None:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def build_index(model, data_root: str, cfg: SearchConfig, out_dir: str | Path, model_info: dict) -> dict:
    """Embed every image of ``cfg.splits`` under ``data_root`` with ``model``, index them, and write the index
    folder ``out_dir`` atomically. ``model_info`` identifies the model (``sha256`` of its folder, and where it
    came from); returns the index's ``index.json``."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    started = time.perf_counter()
    items: list[Item] = []
    chunks: list[np.ndarray] = []
    skipped: Counter = Counter()
    batch: list[tuple[Item, Image.Image]] = []

    def flush():
        with torch.no_grad():
            emb = model.encode_image([im for _, im in batch], batch_size=cfg.batch_size)
        chunks.append(emb.float().cpu().numpy())
        items.extend(it for it, _ in batch)
        batch.clear()

    for split in cfg.splits:
        folder = storage.join(data_root, "shards", split)
        shards = storage.list_files(folder, ".tar") if storage.exists(folder) else []
        if not shards:
            raise StageInputError(
                f"{folder}: no webdataset shards to index (search.splits names {split!r}); run `mpe data` first"
            )
        for shard in shards:
            for item, data in _shard_items(split, shard, skipped):
                image = _decode(data)
                if image is None:
                    skipped["bad_image"] += 1
                    continue
                batch.append((item, image))
                if len(batch) == cfg.batch_size:
                    flush()
    if batch:
        flush()
    if not items:
        raise StageInputError(f"{data_root}: no readable image in the splits {cfg.splits}; nothing to index")
    emb = np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)
    n, dim = emb.shape
    key = auto_index_key(n, dim, cfg.exact_max) if cfg.index_key == "auto" else cfg.index_key
    try:
        index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ConfigError(f"search.index_key: {key!r} is not a faiss index_factory string ({err})") from None
    if not index.is_trained:
        sample = np.random.default_rng(0).permutation(n)[: max(256 * _lists(index), 1)]
        index.train(emb[np.sort(sample)])
    index.add(emb)
    meta = {
        "mpe_version": __version__,
        "model": model_info,
        "index_key": key,
        "requested_key": cfg.index_key,
        "count": n,
        "dim": dim,
        "num_prompts": int(getattr(model, "num_pieces", 1)),
        "metric": "inner_product",
        "nprobe": cfg.nprobe,
        "splits": list(cfg.splits),
        "data_root": str(data_root),
        "skipped": dict(skipped),
        "seconds": round(time.perf_counter() - started, 2),
    }
    columns = {f: [getattr(it, f) for it in items] for f in Item.__dataclass_fields__}
    with atomic_dir(out_dir) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        np.save(tmp / EMBEDDINGS_FILE, emb.astype(np.float16))
        pq.write_table(pa.table(columns), tmp / ITEMS_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    return meta


def _lists(index) -> int:
    import faiss

    try:
        return faiss.extract_index_ivf(index).nlist
    except RuntimeError:
        return 1


@dataclass
class Hit:
    """One result: the item's row, its exact score, and the score's part from each prompt."""

    id: int
    score: float
    prompt_scores: list[float]
    item: Item


def read_meta(folder: str | Path) -> dict:
    """An index folder's ``index.json``, or a :class:`ConfigError` naming the folder."""
    path = Path(folder) / META_FILE
    try:
        meta = json.loads(path.read_text())
        meta["model"]["sha256"]
    except FileNotFoundError:
        raise ConfigError(
            f"{folder}: not a search index ({META_FILE} is missing); build one with `mpe index`"
        ) from None
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: damaged ({type(err).__name__}: {err}); build the index again") from None
    return meta


class ImageIndex:
    """A search index folder opened for queries: the FAISS index and items in memory, the embeddings
    memory-mapped."""

    def __init__(self, folder: str | Path, data_root: str | None = None):
        import faiss
        import pyarrow.parquet as pq

        self.folder = Path(folder)
        self.meta = read_meta(folder)
        try:
            self.index = faiss.read_index(str(self.folder / INDEX_FILE))
            table = pq.read_table(self.folder / ITEMS_FILE).to_pydict()
            self.embeddings = np.load(self.folder / EMBEDDINGS_FILE, mmap_mode="r")
        except (OSError, RuntimeError, ValueError) as err:
            raise ConfigError(f"{self.folder}: damaged search index ({err}); build it again with `mpe index`") from None
        self.items = [Item(**dict(zip(table, row))) for row in zip(*table.values())]
        if not (len(self.items) == self.index.ntotal == len(self.embeddings)):
            raise ConfigError(
                f"{self.folder}: {len(self.items)} items, {self.index.ntotal} index vectors and "
                f"{len(self.embeddings)} embeddings disagree; build the index again"
            )
        if _lists(self.index) > 1:
            faiss.ParameterSpace().set_index_parameter(self.index, "nprobe", int(self.meta["nprobe"]))
        self.data_root = data_root if data_root is not None else self.meta["data_root"]

    @property
    def model_sha256(self) -> str:
        return self.meta["model"]["sha256"]

    def check_model(self, sha256: str, what: str) -> None:
        """A :class:`ConfigError` unless the index was built from the model ``sha256`` identifies."""
        if sha256 != self.model_sha256:
            raise ConfigError(
                f"{self.folder}: this search index was built from another model ({self.model_sha256[:12]}, "
                f"{self.meta['model'].get('source', '?')}) than {what} ({sha256[:12]}); "
                "rebuild it with `mpe index --model ...`"
            )

    def search(self, query: np.ndarray, k: int) -> list[Hit]:
        """The ``k`` best images for one L2-normalised query embedding, best first."""
        q = np.ascontiguousarray(np.asarray(query, dtype=np.float32).reshape(1, -1))
        _, ids = self.index.search(q, min(k, len(self.items)))
        ids = [int(i) for i in ids[0] if i >= 0]
        if not ids:
            return []
        emb = np.asarray(self.embeddings[ids], dtype=np.float32)
        pieces = int(self.meta["num_prompts"])
        parts = (emb.reshape(len(ids), pieces, -1) * q.reshape(1, pieces, -1)).sum(-1)
        scores = parts.sum(1)
        order = np.argsort(-scores, kind="stable")
        return [Hit(ids[i], float(scores[i]), [float(p) for p in parts[i]], self.items[ids[i]]) for i in order]

    def image(self, item_id: int) -> tuple[bytes, str]:
        """The stored image bytes of item ``item_id`` and their MIME type, read from its shard."""
        it = self.items[item_id]
        with storage.open_read(storage.join(self.data_root, *it.shard.split("/"))) as f:
            f.seek(it.offset)
            data = f.read(it.size)
        if len(data) != it.size:
            raise OSError(f"{it.shard}: shorter than the index says (item {item_id}); the data changed")
        return data, MIME.get(it.ext, "application/octet-stream")
