"""Evaluating a model: retrieval R@k both ways (all, and compositional), negation accuracy, zero-shot
classification with prompt ensembles, chance levels, and per-prompt patch maps."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from mpe import storage
from mpe.cache_store import TextStates
from mpe.data.evaluation_sets import negation_queries, zero_shot_tasks
from mpe.data.loader import load_split
from mpe.objective import text_from_cache
from mpe.retrieval_metrics import retrieval_metrics


class TextEmbedder:
    """Embeds texts with a model, finishing from the hidden-state cache where it holds the text."""

    def __init__(self, model, cache: TextStates | None = None, batch_size: int = 64):
        self.model, self.cache, self.batch_size = model, cache, batch_size

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            chunk = texts[i:i + self.batch_size]
            if self.cache is not None and all(t in self.cache for t in chunk):
                states, lens = self.cache.batch(chunk)
                out.append(text_from_cache(self.model, states.to(self.model.device), lens).embedding)
            else:
                out.append(self.model.encode_text(chunk))
        return torch.cat(out)


@torch.no_grad()
def embed_images(model, images, batch_size: int = 64) -> torch.Tensor:
    return torch.cat([model.encode_image(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def retrieval_on(samples, text_embed, image_emb, ks) -> dict:
    texts = list(dict.fromkeys(s.caption for s in samples))
    pos = torch.tensor([[s.caption == t for s in samples] for t in texts], dtype=torch.bool)
    res = retrieval_metrics(text_embed(texts), image_emb, pos, ks)
    res["n_texts"], res["n_images"] = len(texts), len(samples)
    return res


def evaluate_model(model, data_root: str | Path, embed_text, ks=(1, 5, 10)) -> dict:
    """All metrics of one model on the test split, the negation set and the zero-shot tasks (those present)."""
    test, skipped = load_split(storage.join(data_root, "shards", "test"))
    image_emb = embed_images(model, [s.image for s in test])
    out = {"test": retrieval_on(test, embed_text, image_emb, ks), "skipped_test_samples": dict(skipped)}
    comp = [i for i, s in enumerate(test) if s.meta.get("compositional")]
    if comp:
        out["test_compositional"] = retrieval_on([test[i] for i in comp], embed_text, image_emb[comp], ks)
    queries = negation_queries(data_root)
    negation_shards = storage.join(data_root, "shards", "negation")
    if queries and storage.list_files(negation_shards, ".tar"):
        by_id = {s.meta.get("id"): s.image for s in load_split(negation_shards)[0]}
        queries = [q for q in queries if q["positive"] in by_id and q["negative"] in by_id]
        if queries:
            q_emb = embed_text([q["query"] for q in queries])
            a = embed_images(model, [by_id[q["positive"]] for q in queries])
            b = embed_images(model, [by_id[q["negative"]] for q in queries])
            out["negation_accuracy"] = ((q_emb * a).sum(1) > (q_emb * b).sum(1)).float().mean().item()
            out["negation_queries"] = len(queries)
    for task, classes in zero_shot_tasks(data_root).items():
        names = list(classes)
        emb = torch.stack([F.normalize(embed_text(classes[c]).mean(0), dim=-1) for c in names])
        pred = (image_emb @ emb.T).argmax(1)
        truth = torch.tensor([names.index(s.meta.get(f"main_{task}")) for s in test])
        out[f"zero_shot_{task}_accuracy"] = (pred == truth).float().mean().item()
        out[f"zero_shot_{task}_classes"] = len(names)
    return out


@torch.no_grad()
def prompt_patch_maps(model, images, text_emb: torch.Tensor) -> torch.Tensor:
    """``(N, K, g, g)``: how much each image patch agrees with each prompt's piece of its caption.

    Patch states (after the ViT's final norm, before attention pooling) go through the image
    projection; segment k of each patch is scored against segment k of the caption embedding.
    """
    pixels = model.pixel_values(images)
    patches = model.vision.vit(pixel_values=pixels).last_hidden_state
    proj = model.vision.proj(patches)  # (N, P, D)
    k = model.num_pieces
    n, p, d = proj.shape
    seg_p = F.normalize(proj.view(n, p, k, d // k), dim=-1)
    seg_t = F.normalize(text_emb.view(n, 1, k, d // k), dim=-1)
    scores = (seg_p * seg_t).sum(-1).permute(0, 2, 1)  # (N, K, P)
    g = int(p ** 0.5)
    return scores.reshape(n, k, g, g)


def chance_levels(result: dict, ks) -> dict:
    """What random scores would give on the same sets."""
    n = result["test"]["n_images"]
    ch = {f"text_to_image_R@{k}": min(1.0, k / n) for k in ks}
    ch.update({f"image_to_text_R@{k}": min(1.0, k / result['test']['n_texts']) for k in ks})
    ch["negation_accuracy"] = 0.5
    for key, n_classes in result.items():
        if key.startswith("zero_shot_") and key.endswith("_classes"):
            ch[key.removesuffix("_classes") + "_accuracy"] = 1 / n_classes
    return ch


def flat_metrics(result: dict) -> dict:
    """The headline numbers of one model as a flat dict (for MLflow and plots)."""
    flat = {k: v for k, v in result["test"].items() if "@" in k}
    for k, v in result.get("test_compositional", {}).items():
        if "@" in k:
            flat[f"compositional_{k}"] = v
    for k, v in result.items():
        if k == "negation_accuracy" or (k.startswith("zero_shot_") and k.endswith("_accuracy")):
            flat[k] = v
    return flat
