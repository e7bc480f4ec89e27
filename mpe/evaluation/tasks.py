"""Evaluating a model: retrieval R@k both ways (all, and compositional), negation accuracy, zero-shot
classification with prompt ensembles, chance levels, and per-prompt patch maps."""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from mpe.cache.store import TextStates
from mpe.data.evaluation_sets import aspect_probes, negation_queries, zero_shot_tasks
from mpe.data.loader import load_split
from mpe.evaluation.linear_probe import probe_aspects
from mpe.evaluation.metrics import retrieval_metrics
from mpe.evaluation.prompt_analysis import aspect_accuracy, caption_over_negated, inter_prompt_cosine, per_prompt_recall
from mpe.files import storage
from mpe.model.objective import text_from_cache
from mpe.model.text.tower import TextEmbedding


class TextEmbedder:
    """Embeds texts with a model, finishing from the hidden-state cache where it holds the text."""

    def __init__(self, model, cache: TextStates | None = None, batch_size: int = 64):
        self.model, self.cache, self.batch_size = model, cache, batch_size

    @torch.no_grad()
    def features(self, texts: list[str]) -> TextEmbedding:
        """Embeddings, raw prompt pieces and (with negation) negated embeddings of ``texts``."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            chunk = texts[i : i + self.batch_size]
            if self.cache is not None and all(t in self.cache for t in chunk):
                states, lens = self.cache.batch(chunk)
                out.append(text_from_cache(self.model, states.to(self.model.device), lens))
            else:
                out.append(self.model.text_features(chunk))
        cat = lambda name: None if getattr(out[0], name) is None else torch.cat([getattr(o, name) for o in out])  # noqa: E731
        return TextEmbedding(cat("embedding"), cat("pieces"), cat("negated"), cat("negated_pieces"))

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.features(texts).embedding


@torch.no_grad()
def embed_images(model, images, batch_size: int = 64) -> torch.Tensor:
    return torch.cat([model.encode_image(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def retrieval_on(samples, text_embed, image_emb, ks, pieces: int = 1) -> dict:
    """R@k both ways; with ``pieces`` > 1 also text→image R@1 of each prompt's segment alone."""
    texts = list(dict.fromkeys(s.caption for s in samples))
    pos = torch.tensor([[s.caption == t for s in samples] for t in texts], dtype=torch.bool)
    emb = text_embed(texts)
    res = retrieval_metrics(emb, image_emb, pos, ks)
    if pieces > 1:
        for i, r in enumerate(per_prompt_recall(emb, image_emb, pos, pieces)):
            res[f"prompt_{i + 1}_text_to_image_R@1"] = r
    res["n_texts"], res["n_images"] = len(texts), len(samples)
    return res


def split_embeddings(model, data_root: str | Path, split: str, embed_text) -> tuple:
    """``(text embeddings, image embeddings, positives)`` of a split's unique captions and images."""
    samples, _ = load_split(storage.join(data_root, "shards", split))
    texts = list(dict.fromkeys(s.caption for s in samples))
    pos = torch.tensor([[s.caption == t for s in samples] for t in texts], dtype=torch.bool)
    return embed_text(texts), embed_images(model, [s.image for s in samples]), pos


def analyse_prompts(model, embed_text: TextEmbedder, samples, image_emb, probes: list[dict]) -> dict:
    """Inter-prompt cosine, caption vs negated embedding, and the per-prompt aspect probe (``probes``)."""
    k = model.num_pieces
    feats = embed_text.features([s.caption for s in samples])
    out = {"inter_prompt_cosine": inter_prompt_cosine(feats.pieces)}
    if feats.negated is not None:
        out["caption_over_negated_accuracy"] = caption_over_negated(image_emb, feats.embedding, feats.negated)
    by_id = {s.meta.get("id"): i for i, s in enumerate(samples)}
    probes = [p for p in probes if p["id"] in by_id]
    if probes:
        rows = [by_id[p["id"]] for p in probes]
        variants = {a: embed_text([p["variants"][a] for p in probes]) for a in probes[0]["variants"]}
        out["aspects"] = aspect_accuracy(image_emb[rows], embed_text([p["caption"] for p in probes]), variants, k)
        out["aspect_probes"] = len(probes)
    return out


def linear_probes(model, data_root: str | Path, test, test_emb: torch.Tensor, train_images: int, seed: int) -> dict:
    """The aspect probes (``mpe.evaluation.linear_probe``) of the model's image embeddings: fitted on
    ``train_images`` training images (a sample fixed by ``seed``, so every model is probed on the same images;
    all of them when the split has fewer), scored on the test split; empty when the images carry no scene
    labels (a URL list) or ``train_images`` is 0."""
    if train_images == 0 or not any("main_shape" in s.meta for s in test):
        return {}
    train, _ = load_split(storage.join(data_root, "shards", "train"))
    if len(train) > train_images:
        train = [train[i] for i in sorted(random.Random(seed).sample(range(len(train)), train_images))]
    train_emb = embed_images(model, [s.image for s in train])
    return probe_aspects(train_emb, [s.meta for s in train], test_emb, [s.meta for s in test])


def evaluate_split(model, data_root: str | Path, split: str, embed_text, ks=(1, 5, 10)) -> dict:
    """Retrieval on another split (the validation split, for choices that must not see the test split)."""
    samples, skipped = load_split(storage.join(data_root, "shards", split))
    image_emb = embed_images(model, [s.image for s in samples])
    return {
        split: retrieval_on(samples, embed_text, image_emb, ks, model.num_pieces),
        f"skipped_{split}_samples": dict(skipped),
    }


def evaluate_model(
    model, data_root: str | Path, embed_text, ks=(1, 5, 10), probe_train_images: int = 0, seed: int = 0
) -> dict:
    """All metrics of one model on the test split, the negation set and the zero-shot tasks (those present);
    with ``probe_train_images`` > 0 also the linear probes (``linear_probes``)."""
    test, skipped = load_split(storage.join(data_root, "shards", "test"))
    image_emb = embed_images(model, [s.image for s in test])
    out = {
        "test": retrieval_on(test, embed_text, image_emb, ks, model.num_pieces),
        "skipped_test_samples": dict(skipped),
    }
    if isinstance(embed_text, TextEmbedder) and model.num_pieces > 1:
        out["prompts"] = analyse_prompts(model, embed_text, test, image_emb, aspect_probes(data_root))
    elif isinstance(embed_text, TextEmbedder):  # one embedding: the aspect probe with the whole embedding only
        probes = [p for p in aspect_probes(data_root) if p["id"] in {s.meta.get("id") for s in test}]
        if probes:
            by_id = {s.meta.get("id"): i for i, s in enumerate(test)}
            rows = [by_id[p["id"]] for p in probes]
            variants = {a: embed_text([p["variants"][a] for p in probes]) for a in probes[0]["variants"]}
            out["prompts"] = {
                "aspects": aspect_accuracy(image_emb[rows], embed_text([p["caption"] for p in probes]), variants, 1),
                "aspect_probes": len(probes),
            }
    out["probes"] = linear_probes(model, data_root, test, image_emb, probe_train_images, seed)
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

    Patch states (after the ViT's final norm, before pooling; a CLIP class token left out) go through
    the image projection; segment k of each patch is scored against segment k of the caption embedding.
    """
    patches = model.vision.patch_states(model.pixel_values(images))
    proj = model.vision.proj(patches)  # (N, P, D)
    k = model.num_pieces
    n, p, d = proj.shape
    seg_p = F.normalize(proj.view(n, p, k, d // k), dim=-1)
    seg_t = F.normalize(text_emb.view(n, 1, k, d // k), dim=-1)
    scores = (seg_p * seg_t).sum(-1).permute(0, 2, 1)  # (N, K, P)
    g = int(p**0.5)
    return scores.reshape(n, k, g, g)


def chance_levels(result: dict, ks) -> dict:
    """What random scores would give on the same sets."""
    n = result["test"]["n_images"]
    ch = {f"text_to_image_R@{k}": min(1.0, k / n) for k in ks}
    ch.update({f"image_to_text_R@{k}": min(1.0, k / result["test"]["n_texts"]) for k in ks})
    ch["negation_accuracy"] = 0.5
    for key, n_classes in result.items():
        if key.startswith("zero_shot_") and key.endswith("_classes"):
            ch[key.removesuffix("_classes") + "_accuracy"] = 1 / n_classes
    return ch


def flat_metrics(result: dict) -> dict:
    """The headline numbers of one model as a flat dict (for MLflow and plots)."""
    flat = {k: v for k, v in result["test"].items() if "@" in k and not k.startswith("prompt_")}
    for k, v in result.get("test_compositional", {}).items():
        if "@" in k and not k.startswith("prompt_"):
            flat[f"compositional_{k}"] = v
    for k, v in result.items():
        if k == "negation_accuracy" or (k.startswith("zero_shot_") and k.endswith("_accuracy")):
            flat[k] = v
    return flat


def analysis_metrics(result: dict) -> dict:
    """Per-prompt and negated-prompt numbers, flat (``prompt_2_text_to_image_R@1``, ``aspect_colour_full``, …)."""
    flat = {k: v for k, v in result["test"].items() if k.startswith("prompt_")}
    prompts = result.get("prompts", {})
    for k in ("inter_prompt_cosine", "caption_over_negated_accuracy"):
        if k in prompts:
            flat[k] = prompts[k]
    for aspect, row in prompts.get("aspects", {}).items():
        for who, v in row.items():
            if who == "prompt_1" and "prompt_2" not in row:
                continue  # one embedding: its only segment is the whole embedding
            flat[f"aspect_{aspect}_{who}"] = v
    flat.update(result.get("probes", {}))
    return flat
