"""The "vanilla CLIP" baseline: a small causal text transformer trained from scratch.

Token and position embeddings, pre-norm transformer blocks under a causal mask, a final norm, and
the state at the end-of-text token projected to D (as in CLIP). It borrows only the tokenizer of the
base LLM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mpe.model.configuration import VanillaTextConfig
from mpe.model.text.tower import TextEmbedding


class VanillaCLIPTextTower(nn.Module):
    def __init__(self, tokenizer, cfg: VanillaTextConfig, embed_dim: int):
        super().__init__()
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.token_embedding = nn.Embedding(len(tokenizer), cfg.width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
        block = nn.TransformerEncoderLayer(
            cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(block, cfg.layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.proj.weight.device

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids ``(N, T)`` ending in eos, and the eos column of each row."""
        eos = self.tokenizer.eos_token_id
        bos = self.tokenizer.bos_token_id
        rows = []
        for text in texts:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = ([bos] if bos is not None else []) + ids
            rows.append(ids[: self.cfg.context_length - 1] + [eos])
        t = max(len(r) for r in rows)
        out = torch.full((len(rows), t), eos, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        return out.to(self.device), torch.tensor([len(r) - 1 for r in rows], device=self.device)

    def forward(self, texts: list[str]) -> TextEmbedding:
        ids, last = self.tokenize(texts)
        t = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:t]
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        x = self.ln_final(self.transformer(x, mask=causal, is_causal=True))
        piece = self.proj(x[torch.arange(len(texts), device=ids.device), last])[:, None]
        return TextEmbedding(F.normalize(piece.flatten(1), dim=-1), piece)
