"""The method: ``MultiPromptCLIP`` (an LLM text tower read through K adaptive prompts, a ViT image tower, a
contrastive head), its configuration, its losses and the base LLM it starts from.

``from mpe.model import MultiPromptCLIP`` is the public entry point (docs/API.md)."""

from mpe.model.multi_prompt_clip import MultiPromptCLIP

__all__ = ["MultiPromptCLIP"]
