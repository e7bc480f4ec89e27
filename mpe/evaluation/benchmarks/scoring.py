"""Evaluating a model on the configured benchmarks: every benchmark is read (files checked) before any
model loads, then scored. Retrieval is R@k both ways with several captions per image (CLIP_benchmark's
definition: a caption hits when its image is in the top k, an image when any of its captions is);
classification is top-k accuracy against CLIP's template ensemble; multiple choice is the accuracy of
picking the right caption. Metric keys are ``<benchmark>.<metric>``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mpe.evaluation.benchmarks import clip_wds, image_folder, karpathy, msrvtt, negbench
from mpe.evaluation.benchmarks.sets import ChoiceSet, ClassificationSet, Images, RetrievalSet
from mpe.evaluation.benchmarks.video_sets import VideoRetrievalSet, video_retrieval
from mpe.evaluation.metrics import hits_at_k, retrieval_metrics
from mpe.evaluation.tasks import embed_images

READERS = {
    "karpathy": karpathy.read,
    "clip_benchmark_wds": clip_wds.read,
    "image_folder": image_folder.read,
    "negbench_mcq": negbench.read,
    "msrvtt": msrvtt.read,
}


def read_benchmarks(benchmarks: list) -> dict[str, object]:
    """``{name: set}`` of ``evaluate.benchmarks`` entries; a missing or malformed file fails here, named."""
    return {b.name: READERS[b.kind](b) for b in benchmarks}


def retrieval(model, data: RetrievalSet, embed_text, ks, batch_size: int) -> dict:
    image_emb = embed_images(model, Images(data.images), batch_size)
    positives = torch.zeros(len(data.captions), len(data.images), dtype=torch.bool)
    positives[torch.arange(len(data.captions)), torch.tensor(data.caption_image)] = True
    out = retrieval_metrics(embed_text(data.captions), image_emb, positives, ks)
    return {**out, "n_images": len(data.images), "n_texts": len(data.captions)}


def class_embeddings(embed_text, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """``(C, D)``: per class, the mean of the normalised embeddings of every template, renormalised."""
    texts = [t.format(c=c) for c in classnames for t in templates]
    emb = F.normalize(embed_text(texts), dim=-1).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)


def classification(model, data: ClassificationSet, embed_text, batch_size: int) -> dict:
    scores = (
        embed_images(model, Images(data.images), batch_size)
        @ class_embeddings(embed_text, data.classnames, data.templates).T
    )
    truth = F.one_hot(torch.tensor(data.labels), len(data.classnames)).bool()
    out = {
        f"top{k}_accuracy": hits_at_k(scores, truth, k).float().mean().item()
        for k in data.top_k
        if k <= len(data.classnames)
    }  # top-k over k classes or fewer says nothing
    return {**out, "n_images": len(data.images), "n_classes": len(data.classnames)}


def multiple_choice(model, data: ChoiceSet, embed_text, batch_size: int) -> dict:
    texts = list(dict.fromkeys(c for row in data.choices for c in row))
    index = {t: i for i, t in enumerate(texts)}
    text_emb = embed_text(texts)
    image_emb = embed_images(model, Images(data.images), batch_size)
    options = torch.tensor([[index[c] for c in row] for row in data.choices])  # (N, options)
    scores = (image_emb[:, None, :] * text_emb[options]).sum(-1)
    truth = F.one_hot(torch.tensor(data.answers), options.shape[1]).bool()
    right = hits_at_k(scores, truth, 1).float()
    out = {"accuracy": right.mean().item()}
    for group in sorted({g for g in data.groups if g}):
        out[f"accuracy_{group}"] = right[[g == group for g in data.groups]].mean().item()
    return {**out, "n_questions": len(data.images), "n_options": options.shape[1]}


def score(model, data, embed_text, ks=(1, 5, 10), batch_size: int = 64) -> dict:
    """Metrics (and ``n_*`` counts) of one benchmark set."""
    if isinstance(data, RetrievalSet):
        return retrieval(model, data, embed_text, ks, batch_size)
    if isinstance(data, ClassificationSet):
        return classification(model, data, embed_text, batch_size)
    if isinstance(data, ChoiceSet):
        return multiple_choice(model, data, embed_text, batch_size)
    if isinstance(data, VideoRetrievalSet):
        return video_retrieval(model, data, embed_text, ks, batch_size)
    raise TypeError(f"not a benchmark set: {type(data).__name__}")


def benchmark_metrics(
    model, sets: dict[str, object], embed_text, ks=(1, 5, 10), batch_size: int = 64
) -> tuple[dict, dict]:
    """``(flat, details)``: ``{"<name>.<metric>": value}`` for MLflow and the gate, and each set's full
    result with its counts."""
    details = {name: score(model, data, embed_text, ks, batch_size) for name, data in sets.items()}
    flat = {  # the metrics: not the counts, nor what a video set left out (details)
        f"{name}.{k}": v
        for name, r in details.items()
        for k, v in r.items()
        if not k.startswith("n_") and isinstance(v, (int, float))
    }
    return flat, details
