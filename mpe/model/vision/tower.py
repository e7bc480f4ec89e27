"""The vision tower: a ViT (SigLIP-style from scratch, or a pretrained SigLIP / CLIP checkpoint), its
pooled output, then a linear map to D. Frozen (LiT), only that map is trained."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mpe.model.configuration import VisionConfig
from mpe.model.vision.preprocess import ImageTransform


def siglip_config(cfg: VisionConfig):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        vision_use_head=True,
    )


class VisionTower(nn.Module):
    """``pixel_values (N, 3, S, S) -> (N, D)`` L2-normalised image embeddings."""

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        if cfg.pretrained:
            from mpe.model.vision.pretrained import load_vision

            self.vit, self.transform = load_vision(cfg.pretrained)
        else:
            from transformers import SiglipVisionModel

            self.vit = SiglipVisionModel(siglip_config(cfg))
            if cfg.stem == "conv":
                from mpe.model.vision.stem import ConvStem

                self.vit.set_input_embeddings(ConvStem(cfg.patch_size, cfg.hidden_size))
            self.transform = ImageTransform.own(cfg.image_size)
        self.proj = nn.Linear(self.vit.config.hidden_size, embed_dim)
        self.frozen = cfg.freeze
        if self.frozen:
            self.vit.requires_grad_(False)
            self.vit.eval()

    @property
    def image_size(self) -> int:
        return self.vit.config.image_size

    @property
    def has_cls_token(self) -> bool:
        """CLIP prepends a class token to the patches (and pools it); SigLIP attention-pools the patches."""
        return self.vit.config.model_type.startswith("clip")

    def train(self, mode: bool = True) -> VisionTower:
        super().train(mode)
        if self.frozen:  # a locked tower stays in eval mode (no dropout) whatever the model's mode
            self.vit.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.vit(pixel_values=pixel_values)
            pooled = out.pooler_output if out.pooler_output is not None else out.last_hidden_state.mean(1)
        return F.normalize(self.proj(pooled), dim=-1)

    def patch_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, P, hidden)``: one state per image patch after the ViT's final norm (the class token left
        out); the states the pooling reads, in the space the projection maps."""
        out = self.vit(pixel_values=pixel_values)
        if not self.has_cls_token:
            return out.last_hidden_state  # SigLIP applies its final norm to every token
        # CLIP's last_hidden_state is before post_layernorm, which it applies to the pooled class token only
        vision = getattr(self.vit, "vision_model", self.vit)  # transformers 5 flattened CLIPVisionModel
        return vision.post_layernorm(out.last_hidden_state[:, 1:])

    def save_pretrained_vit(self, folder: Path) -> None:
        """A pretrained tower's ViT and preprocessing as a plain checkpoint folder (see ``MultiPromptCLIP``)."""
        from mpe.model.vision.pretrained import save_vision

        save_vision(self.vit, self.transform, folder)
