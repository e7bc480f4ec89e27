"""Uniform access to the parts of a transformers decoder LLM, for running it layer by layer.

Two families are covered: rotary models whose layers hold ``self_attn.{q,k,v,o}_proj`` (Llama,
SmolLM2, Mistral, Qwen2, Gemma, Gemma2, …) and GPT-2 (absolute positions, fused ``c_attn``).
The full masked pass goes through the model's own forward; the trunk/top split calls the decoder
layers directly, and the top can compute queries (and the MLP) only at the readout rows.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from mpe.model.text.prompt_mask import prompt_attention_mask

ROPE = "rope"
GPT2 = "gpt2"


def _family(lm) -> str:
    inner = getattr(lm, "model", None)
    if inner is not None and hasattr(inner, "layers") and hasattr(inner, "rotary_emb"):
        layer = inner.layers[0]
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "q_proj"):
            return ROPE
    inner = getattr(lm, "transformer", None)
    if inner is not None and hasattr(inner, "h") and hasattr(inner.h[0].attn, "c_attn"):
        return GPT2
    raise NotImplementedError(
        f"{type(lm).__name__} ({lm.config.model_type}) is not supported: mpe reads rotary decoders with "
        "q/k/v/o projections (Llama, Gemma, Gemma2, Qwen2, Mistral…) and GPT-2"
    )


def _out(x):
    return x[0] if isinstance(x, tuple) else x


class DecoderAccess:
    """Embeddings, layers, rotary, masks and final norm of one causal LM, with one calling convention."""

    def __init__(self, lm: nn.Module):
        self.lm = lm
        self.family = _family(lm)
        self.backbone = lm.model if self.family == ROPE else lm.transformer
        self.config = lm.config
        if self.family == GPT2 and self.config.reorder_and_upcast_attn:
            raise NotImplementedError("GPT-2 with reorder_and_upcast_attn is not supported")

    # -- structure -------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.layers if self.family == ROPE else self.backbone.h

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def final_norm(self) -> nn.Module:
        return self.backbone.norm if self.family == ROPE else self.backbone.ln_f

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def layer_type(self, i: int) -> str:
        types = getattr(self.config, "layer_types", None)
        return types[i] if types else "full_attention"

    # -- masks -----------------------------------------------------------------------------
    def masks(self, segment_ids: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype) -> dict:
        """The prompt-wise masks by layer type; sliding layers also get their window (by position)."""
        full = prompt_attention_mask(segment_ids, dtype)
        out = {"full_attention": full}
        if any(self.layer_type(i) == "sliding_attention" for i in range(self.num_layers)):
            out["sliding_attention"] = prompt_attention_mask(
                segment_ids, dtype, position_ids, sliding_window=self.config.sliding_window
            )
        return out

    def forward_mask_argument(self, masks: dict):
        """What the model's own forward takes: a dict by layer type where the model has layer types."""
        if getattr(self.config, "layer_types", None):
            return {
                "full_attention": masks["full_attention"],
                "sliding_attention": masks.get("sliding_attention", masks["full_attention"]),
            }
        return masks["full_attention"]

    # -- passes ----------------------------------------------------------------------------
    def full_forward(self, input_ids, masks: dict, position_ids) -> torch.Tensor:
        """The model's own forward with our mask and positions; returns states after the final norm."""
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=self.forward_mask_argument(masks),
            position_ids=position_ids,
            use_cache=False,
        )
        return out.last_hidden_state

    def embed(self, input_ids, position_ids) -> torch.Tensor:
        if self.family == ROPE:
            return self.backbone.embed_tokens(input_ids)
        h = self.backbone.wte(input_ids) + self.backbone.wpe(position_ids)
        return self.backbone.drop(h)

    def position_embeddings(self, h, position_ids):
        return self.backbone.rotary_emb(h, position_ids) if self.family == ROPE else None

    def run_layer(self, i: int, h, masks: dict, position_ids, pos_emb) -> torch.Tensor:
        """Layer ``i`` over every row, through the layer's own forward."""
        layer = self.layers[i]
        mask = masks.get(self.layer_type(i), masks["full_attention"])
        if self.family == ROPE:
            return _out(layer(h, attention_mask=mask, position_ids=position_ids, position_embeddings=pos_emb))
        return _out(layer(h, attention_mask=mask))

    def run_layer_rows(self, i: int, h, rows, masks: dict, pos_emb) -> torch.Tensor:
        """Layer ``i`` with queries, residual and MLP only at ``rows`` (keys/values at every row).

        Returns ``(B, len(rows), H)``: the same values the full layer gives at those rows.
        """
        layer = self.layers[i]
        mask = masks.get(self.layer_type(i), masks["full_attention"])[:, :, rows, :]
        if self.family == ROPE:
            return self._rope_rows(layer, h, rows, mask, pos_emb)
        return self._gpt2_rows(layer, h, rows, mask)

    def _attention(self, attn, q, k, v, mask, module_fns, **extra):
        impl = attn.config._attn_implementation
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(impl, module_fns.eager_attention_forward)
        dropout = attn.attention_dropout if (attn.training and hasattr(attn, "attention_dropout")) else 0.0
        out, _ = fn(attn, q, k, v, mask, dropout=dropout, scaling=attn.scaling, **extra)
        return out

    def _rope_rows(self, layer, h, rows, mask, pos_emb):
        attn = layer.self_attn
        mod = sys.modules[type(attn).__module__]
        b, t, _ = h.shape
        r = len(rows)
        x = layer.input_layernorm(h)
        hd = attn.head_dim
        q = attn.q_proj(x[:, rows]).view(b, r, -1, hd)
        k = attn.k_proj(x).view(b, t, -1, hd)
        v = attn.v_proj(x).view(b, t, -1, hd)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = pos_emb
        q = mod.apply_rotary_pos_emb(q, q, cos[:, rows], sin[:, rows])[0]
        k = mod.apply_rotary_pos_emb(k, k, cos, sin)[0]
        extra = {}
        if hasattr(attn, "attn_logit_softcapping"):
            extra["softcap"] = attn.attn_logit_softcapping
        if hasattr(attn, "sliding_window"):
            extra["sliding_window"] = attn.sliding_window
        out = self._attention(attn, q, k, v, mask, mod, **extra)
        out = attn.o_proj(out.reshape(b, r, -1).contiguous())
        hr = h[:, rows]
        if hasattr(layer, "pre_feedforward_layernorm") and hasattr(layer, "post_feedforward_layernorm"):
            hr = hr + layer.post_attention_layernorm(out)
            return hr + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hr)))
        hr = hr + out
        return hr + layer.mlp(layer.post_attention_layernorm(hr))

    def _gpt2_rows(self, layer, h, rows, mask):
        attn = layer.attn
        mod = sys.modules[type(attn).__module__]
        b, t, e = h.shape
        r = len(rows)
        x = layer.ln_1(h)
        w, bias = attn.c_attn.weight, attn.c_attn.bias  # Conv1D: y = x @ w + bias, w is (in, 3e)
        q = x[:, rows] @ w[:, :e] + bias[:e]
        kv = x @ w[:, e:] + bias[e:]
        k, v = kv.split(e, dim=2)
        hd = attn.head_dim
        q = q.view(b, r, -1, hd).transpose(1, 2)
        k = k.view(b, t, -1, hd).transpose(1, 2)
        v = v.view(b, t, -1, hd).transpose(1, 2)
        out = self._attention(attn, q, k, v, mask, mod)
        out = attn.resid_dropout(attn.c_proj(out.reshape(b, r, -1).contiguous()))
        hr = h[:, rows] + out
        return hr + layer.mlp(layer.ln_2(hr))
