"""Evaluating a model on the configured benchmarks: every benchmark is read (files checked) before any
model loads, then scored. Retrieval is R@k both ways with several captions per image (CLIP_benchmark's
definition: a caption hits when its image is in the top k, an image when any of its captions is);
classification is top-k accuracy against CLIP's template ensemble; multiple choice is the accuracy of
picking the right caption; a caption pair is right when the image scores its caption above the negative
(SugarCrepe per category, ARO's accuracy and macro accuracy over relations or attribute pairs); Winoground's
text, image and group scores as its paper defines them. Metric keys are ``<benchmark>.<metric>``; a
multi-prompt model's caption pairs are also scored with each prompt's segment alone (``analysis``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mpe.evaluation.benchmarks import aro, clip_wds, image_folder, karpathy, negbench, sugarcrepe, winoground
from mpe.evaluation.benchmarks.sets import (
    CaptionPairSet,
    ChoiceSet,
    ClassificationSet,
    Images,
    RetrievalSet,
    WinogroundSet,
)
from mpe.evaluation.metrics import hits_at_k, retrieval_metrics
from mpe.evaluation.prompt_analysis import pieces_of
from mpe.evaluation.tasks import embed_images

READERS = {
    "karpathy": karpathy.read,
    "clip_benchmark_wds": clip_wds.read,
    "image_folder": image_folder.read,
    "negbench_mcq": negbench.read,
    "sugarcrepe": sugarcrepe.read,
    "aro_vg_relation": aro.read,
    "aro_vg_attribution": aro.read,
    "winoground": winoground.read,
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


def _embed_unique(model, refs: list, batch_size: int) -> torch.Tensor:
    """``(len(refs), D)``: each distinct image embedded once (SugarCrepe's categories share their images)."""
    index = {r: i for i, r in enumerate(dict.fromkeys(refs))}
    emb = embed_images(model, Images(list(index)), batch_size)
    return emb[torch.tensor([index[r] for r in refs])]


def _group_accuracy(right: torch.Tensor, groups: list[str]) -> dict[str, float]:
    return {g: right[[x == g for x in groups]].float().mean().item() for g in dict.fromkeys(groups)}


def caption_pairs(model, data: CaptionPairSet, embed_text, batch_size: int) -> dict:
    """Right when ``⟨v, caption⟩ > ⟨v, negative⟩``; per group (SugarCrepe) or overall and macro (ARO)."""
    texts = list(dict.fromkeys(data.captions + data.negatives))
    index = {t: i for i, t in enumerate(texts)}
    text_emb = embed_text(texts)
    cap = text_emb[torch.tensor([index[t] for t in data.captions])]
    neg = text_emb[torch.tensor([index[t] for t in data.negatives])]
    image_emb = _embed_unique(model, data.images, batch_size)
    right = (image_emb * cap).sum(1) > (image_emb * neg).sum(1)
    by_group = _group_accuracy(right, data.groups)
    if data.per_group:
        out = {**by_group, "macro_accuracy": sum(by_group.values()) / len(by_group)}
    else:
        counts = {g: data.groups.count(g) for g in by_group}
        kept = [a for g, a in by_group.items() if counts[g] >= data.min_group_count and g not in data.exclude_groups]
        out = {"accuracy": right.float().mean().item(), "macro_accuracy": sum(kept) / len(kept) if kept else 0.0}
        out["n_groups"] = len(kept)
    k = getattr(model, "num_pieces", 1)
    if k > 1:  # what each prompt's segment alone tells apart
        v, c, n = pieces_of(image_emb, k), pieces_of(cap, k), pieces_of(neg, k)
        analysis = {}
        for i in range(k):
            right_i = (v[:, i] * c[:, i]).sum(1) > (v[:, i] * n[:, i]).sum(1)
            for g, a in _group_accuracy(right_i, data.groups).items():
                analysis[f"{g}_prompt_{i + 1}"] = a
        out["analysis"] = analysis
    return {**out, "n_pairs": len(data.captions)}


def winoground_scores(model, data: WinogroundSet, embed_text, batch_size: int) -> dict:
    """Text score: each image prefers its own caption; image score: each caption prefers its own image; group
    score: both (Thrush et al. 2022)."""
    texts = list(dict.fromkeys(c for pair in data.captions for c in pair))
    index = {t: i for i, t in enumerate(texts)}
    text_emb = embed_text(texts)
    c0 = text_emb[torch.tensor([index[a] for a, _ in data.captions])]
    c1 = text_emb[torch.tensor([index[b] for _, b in data.captions])]
    i0 = _embed_unique(model, [a for a, _ in data.images], batch_size)
    i1 = _embed_unique(model, [b for _, b in data.images], batch_size)
    s = {(c, i): (ct * it).sum(1) for c, ct in ((0, c0), (1, c1)) for i, it in ((0, i0), (1, i1))}
    text = (s[0, 0] > s[1, 0]) & (s[1, 1] > s[0, 1])
    image = (s[0, 0] > s[0, 1]) & (s[1, 1] > s[1, 0])
    return {
        "text_score": text.float().mean().item(),
        "image_score": image.float().mean().item(),
        "group_score": (text & image).float().mean().item(),
        "n_groups": len(data.captions),
    }


def score(model, data, embed_text, ks=(1, 5, 10), batch_size: int = 64) -> dict:
    """Metrics (and ``n_*`` counts) of one benchmark set."""
    if isinstance(data, RetrievalSet):
        return retrieval(model, data, embed_text, ks, batch_size)
    if isinstance(data, ClassificationSet):
        return classification(model, data, embed_text, batch_size)
    if isinstance(data, ChoiceSet):
        return multiple_choice(model, data, embed_text, batch_size)
    if isinstance(data, CaptionPairSet):
        return caption_pairs(model, data, embed_text, batch_size)
    if isinstance(data, WinogroundSet):
        return winoground_scores(model, data, embed_text, batch_size)
    raise TypeError(f"not a benchmark set: {type(data).__name__}")


def benchmark_metrics(
    model, sets: dict[str, object], embed_text, ks=(1, 5, 10), batch_size: int = 64
) -> tuple[dict, dict]:
    """``(flat, details)``: ``{"<name>.<metric>": value}`` for MLflow and the gate, and each set's full
    result with its counts (and, for a multi-prompt model's caption pairs, its per-prompt ``analysis``)."""
    details = {name: score(model, data, embed_text, ks, batch_size) for name, data in sets.items()}
    flat = {
        f"{name}.{k}": v
        for name, r in details.items()
        for k, v in r.items()
        if not k.startswith("n_") and k != "analysis"
    }
    return flat, details


def benchmark_analysis(details: dict) -> dict:
    """The per-prompt numbers of :func:`benchmark_metrics`' details, flat: ``<name>.<group>_prompt_<i>``."""
    return {f"{name}.{k}": v for name, r in details.items() for k, v in r.get("analysis", {}).items()}
