"""SigLIP vision transformer with the MAP attention-pooling head, then a linear map to D."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mpe.config import VisionConfig


def siglip_config(cfg: VisionConfig):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                              image_size=cfg.image_size, patch_size=cfg.patch_size, vision_use_head=True)


class VisionTower(nn.Module):
    """``pixel_values (N, 3, S, S) -> (N, D)`` L2-normalised image embeddings."""

    def __init__(self, cfg: VisionConfig, embed_dim: int, load_pretrained: bool = True):
        super().__init__()
        from transformers import SiglipVisionModel

        self.cfg = cfg
        if cfg.pretrained and load_pretrained:
            self.vit = SiglipVisionModel.from_pretrained(cfg.pretrained)
        else:
            self.vit = SiglipVisionModel(siglip_config(cfg))
        self.proj = nn.Linear(self.vit.config.hidden_size, embed_dim)

    @property
    def image_size(self) -> int:
        return self.vit.config.image_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vit(pixel_values=pixel_values).pooler_output
        return F.normalize(self.proj(pooled), dim=-1)
