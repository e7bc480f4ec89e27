"""The model card: Hugging Face front matter that YAML reads back, holding the evaluation report's numbers
exactly (rounded), the base model by its Hub name, and the card's sections."""

from __future__ import annotations

import yaml

from mpe.model.configuration import ModelConfig
from mpe.serving.model_card import model_card, write_model_card

REPORT = {
    "trained": {
        "text_to_image_R@1": 0.5733,
        "image_to_text_R@5": 0.92666,
        "negation_accuracy": 0.7125,
        "flickr30k.text_to_image_R@5": 0.41,
    },
    "untrained": {"text_to_image_R@1": 0.0067, "image_to_text_R@5": 0.0067, "negation_accuracy": 0.425},
    "chance": {"text_to_image_R@1": 0.0067, "negation_accuracy": 0.5},
}
PROVENANCE = {"steps": 128, "ray_run_name": "mpe-default-abc", "start": {"init_from": "scratch"}}


def _front(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_the_front_matter_holds_the_report_s_numbers_and_the_hub_names():
    card = model_card("mpe-multiprompt", ModelConfig(), PROVENANCE, "smollm2-135m", ["mpe-shapes (synthetic)"], REPORT)
    meta = _front(card)
    assert meta["library_name"] == "mpe"
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["datasets"] == ["mpe-shapes (synthetic)"]
    assert set(meta["metrics"]) == {"recall", "accuracy"}
    (entry,) = meta["model-index"]
    assert entry["name"] == "mpe-multiprompt"
    by_dataset = {}
    for result in entry["results"]:
        for m in result["metrics"]:
            by_dataset.setdefault(result["dataset"]["type"], {})[m["type"]] = m["value"]
    assert by_dataset == {
        "test": {"text_to_image_R@1": 0.5733, "image_to_text_R@5": 0.9267, "negation_accuracy": 0.7125},
        "flickr30k": {"text_to_image_R@5": 0.41},
    }
    tasks = {r["task"]["type"] for r in entry["results"]}
    assert {"text-to-image-retrieval", "image-to-text-retrieval"} <= tasks


def test_the_card_says_what_the_model_is_for_and_how_it_was_trained():
    card = model_card("m", ModelConfig(), PROVENANCE, "google/gemma-2b", ["laion-part-00000.parquet"], REPORT)
    assert _front(card)["base_model"] == "google/gemma-2b"  # a hub id is kept
    body = card.split("---\n", 2)[2]
    for section in ("## The method", "## This model", "## Intended use", "## Evaluation"):
        assert section in body
    assert "K = 4 prompts" in body and "128 steps" in body and "scratch" in body
    assert "| t→i R@1 | 0.573 | 0.007 | 0.007 |" in body
    assert "| negation | 0.713 | 0.425 | 0.500 |" in body


def test_the_card_is_written_into_the_model_folder(tmp_path):
    path = write_model_card(tmp_path, "m", ModelConfig(), PROVENANCE, "smollm2-135m", ["x"], REPORT)
    assert path == tmp_path / "README.md" and _front(path.read_text())["library_name"] == "mpe"
