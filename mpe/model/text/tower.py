"""The multi-prompt LLM text tower: captions in, K projected prompt pieces and a D-dim embedding out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mpe.errors import ConfigError
from mpe.model.configuration import TextConfig
from mpe.model.text.decoder import DecoderAccess
from mpe.model.text.prompt_sequence import (
    CAPTION_SEGMENT,
    PromptBatch,
    arrange,
    build_batch,
    build_layout,
    tokenize_captions,
)

LORA_TARGETS = {
    "rope": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


@dataclass
class TextEmbedding:
    """``embedding`` (N, D) L2-normalised; ``pieces`` (N, K, D/K) raw projected prompt pieces;
    ``negated``/``negated_pieces`` the same for the negated prompts (None when negation is off)."""

    embedding: torch.Tensor
    pieces: torch.Tensor
    negated: torch.Tensor | None = None
    negated_pieces: torch.Tensor | None = None


def pieces_to_embedding(pieces: torch.Tensor) -> torch.Tensor:
    """Concatenate (N, K, D/K) pieces and L2-normalise to (N, D)."""
    return F.normalize(pieces.flatten(1), dim=-1)


class LLMTextTower(nn.Module):
    """A pretrained decoder LLM read through prompts (or a pooling baseline), with trained projections.

    ``trunk`` = embeddings + the first ``L - n_top`` layers (frozen, cacheable); ``top`` = the last
    ``n_top`` layers + final norm, trained, run only at the readout rows. With ``embed_dim=None`` the
    tower has no projections: it computes trunk states and readouts (what the cache needs), not embeddings.
    """

    def __init__(self, lm: nn.Module, tokenizer, cfg: TextConfig, embed_dim: int | None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.lm = lm
        self.decoder = DecoderAccess(lm)
        if cfg.n_top > self.decoder.num_layers:
            raise ConfigError(f"model.text.n_top={cfg.n_top} but the base model has {self.decoder.num_layers} layers")
        self.layout = build_layout(tokenizer, cfg)
        k = self.layout.num_positive
        hidden = self.decoder.hidden_size
        self.proj = nn.ModuleList([nn.Linear(hidden, embed_dim // k) for _ in range(k)] if embed_dim else [])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._apt_ids = [
            i
            for seg in self.layout.segments
            for i in seg
            if i >= 0 and tokenizer.convert_ids_to_tokens(i).startswith("<APT-")
        ]
        self._configure_trainable()

    # -- which parameters train --------------------------------------------------------------
    @property
    def cut(self) -> int:
        """Index of the first top layer."""
        return self.decoder.num_layers - self.cfg.n_top

    def _configure_trainable(self) -> None:
        for p in self.lm.parameters():
            p.requires_grad_(False)
        if self.cfg.tuning == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            lora = LoraConfig(
                r=self.cfg.lora_rank,
                lora_alpha=self.cfg.lora_alpha,
                lora_dropout=0.0,
                target_modules=LORA_TARGETS[self.decoder.family],
            )
            inject_adapter_in_model(lora, self.lm)
            for n, p in self.lm.named_parameters():
                p.requires_grad_("lora_" in n)
        else:
            for layer in self.decoder.layers[self.cut :]:
                for p in layer.parameters():
                    p.requires_grad_(True)
        for p in self.decoder.final_norm.parameters():
            p.requires_grad_(True)
        if self.cfg.train_apt_embeddings and self._apt_ids:
            self._train_only_apt_rows()

    def _train_only_apt_rows(self) -> None:
        weight = self.lm.get_input_embeddings().weight
        weight.requires_grad_(True)
        keep = torch.zeros(weight.shape[0], 1, dtype=weight.dtype)
        keep[self._apt_ids] = 1
        weight.register_hook(lambda g: g * keep.to(g.device, g.dtype))

    # -- inputs ------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> PromptBatch:
        ids = tokenize_captions(self.tokenizer, list(texts), self.cfg.max_caption_tokens)
        return build_batch(ids, self.layout, self.pad_id).to(self.device)

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    def arrange(self, caption_lens: list[int]) -> PromptBatch:
        """Layout for cached states of captions with these token lengths."""
        return arrange(caption_lens, self.layout).to(self.device)

    # -- passes ------------------------------------------------------------------------------
    def _masks(self, batch: PromptBatch, dtype) -> dict:
        return self.decoder.masks(batch.segment_ids, batch.position_ids, dtype)

    def final_states(self, batch: PromptBatch) -> torch.Tensor:
        """(B, T, H) after the final norm, one masked pass through the model's own forward."""
        dtype = self.lm.get_input_embeddings().weight.dtype
        return self.decoder.full_forward(batch.input_ids, self._masks(batch, dtype), batch.position_ids)

    def readouts(self, batch: PromptBatch) -> torch.Tensor:
        """(B, R, H) readout states from one full masked pass."""
        return self._read(self.final_states(batch), batch)

    def trunk(self, batch: PromptBatch) -> torch.Tensor:
        """(B, T, H) hidden states entering the first top layer: what the cache stores."""
        h = self.decoder.embed(batch.input_ids, batch.position_ids)
        masks = self._masks(batch, h.dtype)
        pos_emb = self.decoder.position_embeddings(h, batch.position_ids)
        for i in range(self.cut):
            h = self.decoder.run_layer(i, h, masks, batch.position_ids, pos_emb)
        return h

    def top(self, states: torch.Tensor, batch: PromptBatch, rows_only: bool = True) -> torch.Tensor:
        """(B, R, H) readouts from trunk ``states``: the top layers, then the final norm.

        With ``rows_only`` the last top layer computes queries and MLP at the readout rows only
        (every earlier top layer still needs all rows, since the next layer's keys come from them).
        """
        masks = self._masks(batch, states.dtype)
        pos_emb = self.decoder.position_embeddings(states, batch.position_ids)
        h = states
        mean = self.layout.caption_readout == "mean"
        last = self.decoder.num_layers - 1
        for i in range(self.cut, self.decoder.num_layers):
            if rows_only and not mean and i == last:
                h = self.decoder.run_layer_rows(i, h, batch.readout_cols, masks, pos_emb)
                return self.decoder.final_norm(h)
            h = self.decoder.run_layer(i, h, masks, batch.position_ids, pos_emb)
        return self._read(self.decoder.final_norm(h), batch)

    def _read(self, final: torch.Tensor, batch: PromptBatch) -> torch.Tensor:
        if self.layout.caption_readout == "mean":
            w = (batch.segment_ids == CAPTION_SEGMENT).to(final.dtype)[..., None]
            return ((final * w).sum(1) / w.sum(1).clamp_min(1))[:, None]
        return final[:, batch.readout_cols]

    # -- embeddings --------------------------------------------------------------------------
    def embed_readouts(self, readouts: torch.Tensor) -> TextEmbedding:
        """Project (B, R, H) readouts: piece k through its own linear map, negated ones likewise."""
        k = self.layout.num_positive
        readouts = readouts.to(self.proj[0].weight.dtype)
        pieces = torch.stack([p(readouts[:, i]) for i, p in enumerate(self.proj)], 1)
        out = TextEmbedding(pieces_to_embedding(pieces), pieces)
        if readouts.shape[1] > k:
            neg = torch.stack([p(readouts[:, k + i]) for i, p in enumerate(self.proj)], 1)
            out.negated, out.negated_pieces = pieces_to_embedding(neg), neg
        return out

    def forward(self, texts: list[str]) -> TextEmbedding:
        return self.embed_readouts(self.readouts(self.tokenize(texts)))
