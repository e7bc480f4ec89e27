"""The evaluate stage: retrieval R@1/5/10 both ways, negation accuracy, zero-shot classification,
for the trained model and the untrained one (same architecture, same trunk), plus plots."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from mpe.atomic import write_text
from mpe.data.loader import load_split, split_captions
from mpe.data.shapes import COLOURS, SHAPES
from mpe.retrieval_metrics import chance_recall, retrieval_metrics

def zero_shot_prompts() -> dict[str, dict[str, list[str]]]:
    """Class name → prompt texts, for the main object's shape and colour.

    One grid of prompts "a {colour} {shape}" serves both tasks: a shape's prompts are its phrase in
    every colour, a colour's its phrase on every shape (prompt ensembling, as CLIP does with templates).
    """
    return {"shape": {s: [f"a {c} {s}" for c in COLOURS] for s in SHAPES},
            "colour": {c: [f"a {c} {s}" for s in SHAPES] for c in COLOURS}}


def evaluation_texts(params) -> list[str]:
    """Every text the evaluation embeds (test captions, negation queries, class prompts)."""
    root = Path(params.data.out_dir)
    texts = split_captions(root / "shards" / "test")
    neg = root / "negation.json"
    if neg.exists():
        texts += [q["query"] for q in json.loads(neg.read_text())]
    if params.data.source == "shapes":
        texts += [p for task in zero_shot_prompts().values() for ps in task.values() for p in ps]
    return texts


class TextEmbedder:
    """Embeds texts with a model, finishing from the hidden-state cache where it holds the text."""

    def __init__(self, model, cache=None, batch_size: int = 64):
        self.model, self.cache, self.batch_size = model, cache, batch_size

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        from mpe.objective import text_from_cache

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


def evaluate_model(model, data_root: Path, embed_text, ks=(1, 5, 10), shapes: bool = True) -> dict:
    """All metrics of one model on the test split (and the negation set when present)."""
    test, skipped = load_split(data_root / "shards" / "test")
    image_emb = embed_images(model, [s.image for s in test])
    out = {"test": retrieval_on(test, embed_text, image_emb, ks), "skipped_test_samples": dict(skipped)}
    comp = [i for i, s in enumerate(test) if s.meta.get("compositional")]
    if comp:
        out["test_compositional"] = retrieval_on([test[i] for i in comp], embed_text, image_emb[comp], ks)
    neg_file = data_root / "negation.json"
    if neg_file.exists() and (data_root / "shards" / "negation").exists():
        queries = json.loads(neg_file.read_text())
        by_id = {s.meta.get("id"): s.image for s in load_split(data_root / "shards" / "negation")[0]}
        queries = [q for q in queries if q["positive"] in by_id and q["negative"] in by_id]
        if queries:
            q_emb = embed_text([q["query"] for q in queries])
            a = embed_images(model, [by_id[q["positive"]] for q in queries])
            b = embed_images(model, [by_id[q["negative"]] for q in queries])
            out["negation_accuracy"] = ((q_emb * a).sum(1) > (q_emb * b).sum(1)).float().mean().item()
            out["negation_queries"] = len(queries)
    if shapes:
        for task, classes in zero_shot_prompts().items():
            names = list(classes)
            emb = torch.stack([F.normalize(embed_text(classes[c]).mean(0), dim=-1) for c in names])
            pred = (image_emb @ emb.T).argmax(1)
            truth = torch.tensor([names.index(s.meta.get(f"main_{task}")) for s in test])
            out[f"zero_shot_{task}_accuracy"] = (pred == truth).float().mean().item()
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
    n = result["test"]["n_images"]
    ch = {f"text_to_image_R@{k}": min(1.0, k / n) for k in ks}
    ch.update({f"image_to_text_R@{k}": min(1.0, k / result['test']['n_texts']) for k in ks})
    ch.update({"negation_accuracy": 0.5, "zero_shot_shape_accuracy": 1 / len(SHAPES),
               "zero_shot_colour_accuracy": 1 / len(COLOURS)})
    return ch


def flat_metrics(result: dict) -> dict:
    """The headline numbers of one model as a flat dict (for MLflow and plots)."""
    flat = {k: v for k, v in result["test"].items() if "@" in k}
    for k, v in result.get("test_compositional", {}).items():
        if "@" in k:
            flat[f"compositional_{k}"] = v
    for k in ("negation_accuracy", "zero_shot_shape_accuracy", "zero_shot_colour_accuracy"):
        if k in result:
            flat[k] = result[k]
    return flat


def run_evaluate_stage(params) -> dict:
    """Evaluate ``train.out_dir`` (and the untrained model) → ``metrics/eval.json`` and plots."""
    from mpe.cache import open_cache
    from mpe.model import MultiPromptCLIP
    from mpe.plots import loss_curves, prompt_maps, recall_bars
    from mpe.text.tower import LLMTextTower

    ks = tuple(params.evaluate.ks)
    data_root = Path(params.data.out_dir)
    shapes = params.data.source == "shapes"
    base_dir = Path(params.base_model.out_dir)
    trained = MultiPromptCLIP.from_pretrained(params.train.out_dir)
    cache = None
    if params.cache.enabled and isinstance(trained.text, LLMTextTower):
        cache = open_cache(params, trained.text, base_dir)
    models = {"trained": trained}
    if params.evaluate.compare_untrained:
        torch.manual_seed(params.seed)
        models["untrained"] = MultiPromptCLIP.from_base(base_dir, params.model).eval()
    results = {}
    for name, model in models.items():
        results[name] = evaluate_model(model, data_root, TextEmbedder(model, cache, params.evaluate.batch_size),
                                       ks, shapes)
    report = {name: flat_metrics(r) for name, r in results.items()}
    report["chance"] = chance_levels(results["trained"], ks)
    report["details"] = results
    out = Path(params.evaluate.out_dir)
    write_text(out / "eval.json", json.dumps(report, indent=1))
    plots = Path(params.evaluate.plots_dir)
    keys = [k for k in report["trained"] if not k.startswith("compositional_")]
    recall_bars({m: report[m] for m in ("trained", "untrained", "chance") if m in report}, keys,
                plots / "recall.png", "test split: trained vs untrained vs chance")
    hist = Path(params.evaluate.out_dir) / "train_history.json"
    if hist.exists():
        loss_curves(json.loads(hist.read_text()), plots / "loss.png")
    test, _ = load_split(data_root / "shards" / "test")
    shown = test[:4]
    emb = TextEmbedder(trained, cache)([s.caption for s in shown])
    prompt_maps([s.image for s in shown], prompt_patch_maps(trained, [s.image for s in shown], emb).numpy(),
                [s.caption for s in shown], plots / "prompt_maps.png")
    log_to_training_run(params, report, plots)
    return report


def log_to_training_run(params, report: dict, plots: Path) -> None:
    """Add the evaluation to the MLflow run that trained the model (from ``metrics/train.json``)."""
    train_file = Path(params.evaluate.out_dir) / "train.json"
    run_id = json.loads(train_file.read_text()).get("mlflow_run_id") if train_file.exists() else None
    if not run_id:
        return
    import mlflow

    from mpe.train import mlflow_settings

    mlflow.set_tracking_uri(mlflow_settings(params)["tracking_uri"])
    with mlflow.start_run(run_id=run_id):
        metrics = {f"eval.{k}": v for k, v in report["trained"].items()}
        metrics.update({f"eval_untrained.{k}": v for k, v in report.get("untrained", {}).items()})
        mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items()})
        for png in sorted(plots.glob("*.png")):
            mlflow.log_artifact(str(png), artifact_path="plots")
