"""The model card of a trained model: ``README.md`` in its folder with Hugging Face's YAML front matter
(``library_name``, ``base_model``, ``datasets``, ``metrics`` and a ``model-index`` holding the test split's
numbers from ``metrics/eval.json``), then what the model is, how it was trained, its intended use, and its
numbers against the untrained twin and chance. The evaluate stage writes it and logs it with the MLflow
model."""

from __future__ import annotations

from pathlib import Path

import yaml

from mpe import __version__
from mpe.files.atomic import write_text
from mpe.model.configuration import ModelConfig
from mpe.records import short_name

CARD_FILE = "README.md"
# The bundled base model's name on the Hugging Face Hub (its GGUF is a quantised copy of this checkpoint).
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
METHOD = (
    "The text tower is a pretrained decoder LLM that reads each caption through K learned adaptive prompts "
    '(" the <APT-i> of the image means:") in one forward pass, under an attention mask that keeps the prompts '
    "apart; the K readouts, each projected to D/K dimensions, form the text embedding. It is trained "
    "contrastively (CLIP or SigLIP loss) against a ViT image tower, with a loss that keeps the prompts "
    "diverse and one that treats each caption's negated reading as a hard negative."
)


def base_model_id(name: str) -> str:
    """The base model as the Hub names it: the bundled name mapped, a hub id kept, a local folder as given."""
    return HUB_IDS.get(name, name)


def _metric_rows(report: dict) -> list[tuple[str, float, float | None, float | None]]:
    """``(metric, trained, untrained, chance)`` for the test split's numbers (benchmarks included)."""
    trained = report.get("trained", {})
    untrained, chance = report.get("untrained", {}), report.get("chance", {})
    return [(k, float(v), untrained.get(k), chance.get(k)) for k, v in trained.items() if isinstance(v, int | float)]


def _task(metric: str) -> tuple[str, str]:
    if "text_to_image" in metric:
        return "text-to-image-retrieval", "Text-to-image retrieval"
    if "image_to_text" in metric:
        return "image-to-text-retrieval", "Image-to-text retrieval"
    return "zero-shot-image-classification", "Zero-shot classification and probes"


def front_matter(name: str, base_model: str, datasets: list[str], report: dict) -> dict:
    """The YAML front matter Hugging Face reads from a model card."""
    tasks: dict[str, list] = {}
    for metric, value, _, _ in _metric_rows(report):
        benchmark, _, short = metric.rpartition(".")
        tasks.setdefault((_task(short), benchmark or "test"), []).append(
            {"type": short, "value": round(value, 4), "name": short_name(short)}
        )
    results = [
        {
            "task": {"type": task_type, "name": task_name},
            "dataset": {"name": dataset if dataset != "test" else f"{datasets[0]} (test split)", "type": dataset},
            "metrics": metrics,
        }
        for ((task_type, task_name), dataset), metrics in tasks.items()
    ]
    return {
        "library_name": "mpe",
        "base_model": base_model_id(base_model),
        "datasets": datasets,
        "metrics": ["recall", "accuracy"],
        "pipeline_tag": "zero-shot-image-classification",
        "tags": ["clip", "vision-language", "multi-prompt", "text-image-retrieval"],
        "model-index": [{"name": name, "results": results}],
    }


def _start(start) -> str:
    if not isinstance(start, dict):
        return "scratch"
    version = start.get("version")
    return f"{start.get('init_from', 'scratch')}" + (f" (version {version})" if version else "")


def _fmt(v) -> str:
    return "" if v is None else f"{v:.3f}"


def model_card(
    name: str, cfg: ModelConfig, provenance: dict, base_model: str, datasets: list[str], report: dict
) -> str:
    """The card's text: front matter, then the model, its training, intended use and numbers."""
    meta = yaml.safe_dump(front_matter(name, base_model, datasets, report), sort_keys=False, allow_unicode=True)
    rows = "\n".join(f"| {short_name(m)} | {_fmt(t)} | {_fmt(u)} | {_fmt(c)} |" for m, t, u, c in _metric_rows(report))
    text = cfg.text
    v = cfg.vision
    if v.pretrained:
        vision = f"pretrained `{provenance.get('vision_pretrained', v.pretrained)}`" + (
            " (frozen: LiT)" if v.freeze else " (fine-tuned)"
        )
    else:
        vision = f"a {v.num_layers}-layer, {v.hidden_size}-wide SigLIP ViT at {v.image_size} px, trained from scratch"
    return f"""---
{meta}---

# {name}

A CLIP-style vision–language embedding model trained with mpe {__version__}
(Context-Adaptive Multi-Prompt Embedding, Kim & Angelova 2025).

## The method

{METHOD}

## This model

| | |
|---|---|
| base LLM | `{base_model_id(base_model)}` (trunk frozen, top {text.n_top} layer(s) trained; tuning `{text.tuning}`) |
| text pooling | `{text.pooling}`, K = {text.num_prompts} prompts{", with negated prompts" if text.negation else ""} |
| vision tower | {vision} |
| embedding | {cfg.embed_dim} dimensions, L2-normalised; loss `{cfg.loss.kind}`, λ_div {cfg.loss.lambda_div}, \
λ_neg {cfg.loss.lambda_neg} |
| training | {provenance.get("steps", "?")} steps, started from `{_start(provenance.get("start"))}` \
(Ray run `{provenance.get("ray_run_name", "?")}`) |
| data | {", ".join(f"`{d}`" for d in datasets)} |

## Intended use

Text–image retrieval and zero-shot classification **on data like its training data**, and research into
multi-prompt text embeddings: embed captions and images (`MultiPromptCLIP.from_pretrained`, the MLflow
pyfunc, or `mpe serve`) and rank by cosine similarity; `MultiPromptCLIP.similarity(..., weights=...)`
re-weights what each prompt captured. Not for decisions about people, and not beyond its training
domain: a model trained on the synthetic shapes world has never seen a photograph. Check the numbers
below on your own data before relying on it.

## Evaluation (test split; `metrics/eval.json`)

| metric | trained | untrained | chance |
|---|---|---|---|
{rows}

```python
from mpe.model import MultiPromptCLIP

model = MultiPromptCLIP.from_pretrained("path/to/this/folder")
scores = model.similarity(model.encode_text(["a red circle"]), model.encode_image([image]))
```
"""


def write_model_card(
    folder: str | Path,
    name: str,
    cfg: ModelConfig,
    provenance: dict,
    base_model: str,
    datasets: list[str],
    report: dict,
) -> Path:
    """Write ``folder/README.md`` (atomically); returns its path."""
    path = Path(folder) / CARD_FILE
    write_text(path, model_card(name, cfg, provenance, base_model, datasets, report))
    return path
