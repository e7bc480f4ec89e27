"""The method: ``MultiPromptCLIP`` (an LLM text tower read through K adaptive prompts, a ViT image tower, a
contrastive head), its configuration, its losses and the base LLM it starts from.

``from mpe.model import MultiPromptCLIP`` is the public entry point (docs/API.md). It is imported on first
use: ``mpe.config`` reads ``mpe.model.configuration``, and a command that only reads its params (``mpe
sources``, ``mpe run``'s driver) should not pay for importing torch and transformers."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpe.model.multi_prompt_clip import MultiPromptCLIP

__all__ = ["MultiPromptCLIP"]


def __getattr__(name: str):
    if name == "MultiPromptCLIP":
        from mpe.model.multi_prompt_clip import MultiPromptCLIP

        return MultiPromptCLIP
    raise AttributeError(f"module 'mpe.model' has no attribute {name!r}")
