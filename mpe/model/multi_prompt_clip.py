"""``MultiPromptCLIP``: the LLM text tower (or a baseline), the vision tower, and the contrastive head.

Saved folder (``save_pretrained``)::

    mpe_config.json          the ModelConfig and provenance
    text_model/              plain transformers checkpoint + tokenizer with the APT tokens (LLM poolings)
    tokenizer/               tokenizer only (vanilla_clip)
    vision_model/            pretrained vision tower only: plain transformers checkpoint + preprocessor config
    mpe_weights.safetensors  everything else: projections, the from-scratch vision tower, logit scale/bias
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from mpe import __version__
from mpe.errors import ConfigError
from mpe.files.atomic import atomic_dir
from mpe.model.configuration import ModelConfig, validate
from mpe.model.text.apt_tokens import add_apt_tokens
from mpe.model.text.lm_io import load_lm, save_plain_lm
from mpe.model.text.tower import LLMTextTower, TextEmbedding
from mpe.model.text.vanilla_clip import VanillaCLIPTextTower
from mpe.model.vision.preprocess import ImageTransform
from mpe.model.vision.tower import VisionTower

CONFIG_FILE = "mpe_config.json"
WEIGHTS_FILE = "mpe_weights.safetensors"
TEXT_DIR = "text_model"
TOKENIZER_DIR = "tokenizer"
VISION_DIR = "vision_model"


def segment_similarity(t: torch.Tensor, v: torch.Tensor, weights, k: int) -> torch.Tensor:
    """``(Nt, Nv)`` of ``Σ_k w_k ⟨t_k, v_k⟩`` over ``k`` equal segments of the embeddings (``weights=None``: all
    ones, the plain dot product): :meth:`MultiPromptCLIP.similarity` for embeddings already computed."""
    if weights is None:
        return t @ v.T
    w = torch.as_tensor(weights, dtype=t.dtype, device=t.device)
    if w.shape != (k,):
        raise ValueError(f"weights must have one entry per prompt ({k}), got shape {tuple(w.shape)}")
    return torch.einsum("akd,bkd,k->ab", t.view(t.shape[0], k, -1), v.view(v.shape[0], k, -1), w)


class MultiPromptCLIP(nn.Module):
    """A CLIP-style model whose text tower reads a pretrained LLM through K adaptive prompts."""

    def __init__(self, cfg: ModelConfig, text: nn.Module, vision: VisionTower, provenance: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.text = text
        self.vision = vision
        self.provenance = dict(provenance or {})
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.loss.initial_logit_scale)))
        if cfg.loss.kind == "siglip":
            self.logit_bias = nn.Parameter(torch.tensor(cfg.loss.init_logit_bias))
        else:
            self.logit_bias = None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_base(
        cls,
        base_dir: str | Path,
        cfg: ModelConfig,
        dtype=torch.float32,
        trust_remote_code: bool = False,
        provenance: dict | None = None,
        seed: int | None = None,
    ) -> MultiPromptCLIP:
        """An untrained model on the base LLM in ``base_dir`` (APT tokens added if missing).

        With ``seed`` the new weights are drawn from it: every training worker builds the same model.
        """
        if seed is not None:
            torch.manual_seed(seed)
        lm, tok = load_lm(base_dir, cfg.text.attn_implementation, dtype, trust_remote_code)
        if cfg.text.pooling == "vanilla_clip":
            text = VanillaCLIPTextTower(tok, cfg.text.vanilla, cfg.embed_dim)
        else:
            if cfg.text.uses_apt:
                add_apt_tokens(lm, tok, cfg.text.num_prompts, seed=cfg.text.apt_init_seed)
            text = LLMTextTower(lm, tok, cfg.text, cfg.embed_dim)
        provenance = dict(provenance or {})
        if cfg.vision.pretrained:  # its folder's name: the saved model holds no path of this machine
            provenance.setdefault("vision_pretrained", Path(cfg.vision.pretrained).name)
        return cls(cfg, text, VisionTower(cfg.vision, cfg.embed_dim), provenance)

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def num_pieces(self) -> int:
        return getattr(self.text, "layout", None).num_positive if hasattr(self.text, "layout") else 1

    # -- encoding ----------------------------------------------------------------------------
    def text_features(self, texts: list[str]) -> TextEmbedding:
        """Embedding, pieces and (with negation) negated embedding of a batch of captions."""
        return self.text(list(texts))

    def encode_text(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """``(N, D)`` L2-normalised text embeddings."""
        return torch.cat(
            [self.text(list(texts[i : i + batch_size])).embedding for i in range(0, len(texts), batch_size)]
        )

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        return self.vision.transform(images).to(self.device)

    def encode_image(self, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """``(N, D)`` L2-normalised image embeddings."""
        return torch.cat(
            [self.vision(self.pixel_values(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
        )

    @property
    def image_transform(self) -> ImageTransform:
        """How a picture becomes the vision tower's input; its ``to_uint8`` shrinks one picture at once, so
        a caller that shrinks each as soon as it is decoded holds no full-size image (``encode_pixels``)."""
        return self.vision.transform

    def encode_pixels(self, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """``(N, D)`` L2-normalised embeddings of ``(N, 3, size, size)`` uint8 inputs from
        ``image_transform.to_uint8``; equal to ``encode_image`` of the pictures they came from."""
        norm = self.vision.transform.normalize
        return torch.cat(
            [self.vision(norm(pixels[i : i + batch_size]).to(self.device)) for i in range(0, len(pixels), batch_size)]
        )

    def similarity(self, t: torch.Tensor, v: torch.Tensor, weights=None) -> torch.Tensor:
        """``s(t, v) = Σ_k w_k ⟨t_k, v_k⟩`` over the K segments of D; ``(Nt, Nv)``.

        With ``weights=None`` (all ones) this is the plain dot product of the normalised embeddings;
        other weights re-weight the aspects captured by each prompt.
        """
        return segment_similarity(t, v, weights, self.num_pieces)

    def prompt_readouts(self, texts: list[str], negated: bool = False) -> torch.Tensor:
        """``(N, K, hidden)``: the LLM states read at each prompt (or negated prompt)."""
        if not isinstance(self.text, LLMTextTower):
            raise TypeError("prompt_readouts needs an LLM text tower (pooling is vanilla_clip)")
        r = self.text.readouts(self.text.tokenize(list(texts)))
        k = self.text.layout.num_positive
        if negated:
            if r.shape[1] <= k:
                raise ValueError("this model has no negated prompts (model.text.negation is false)")
            return r[:, k:]
        return r[:, :k]

    def scale_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The logit scale (``exp`` of the parameter, capped) and the sigmoid bias (or None)."""
        return self.logit_scale.exp().clamp(max=self.cfg.loss.max_logit_scale), self.logit_bias

    # -- persistence -------------------------------------------------------------------------
    def _separate(self, key: str) -> bool:
        """Weights saved in their own checkpoint folder: the LLM, and a pretrained vision tower's ViT."""
        return key.startswith("text.lm.") or (bool(self.cfg.vision.pretrained) and key.startswith("vision.vit."))

    def _head_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if not self._separate(k)}

    def save_pretrained(self, out: str | Path) -> Path:
        """Write the model folder atomically (a temp folder renamed into place)."""
        out = Path(out)
        with atomic_dir(out) as tmp:
            if isinstance(self.text, LLMTextTower):
                save_plain_lm(_merged_lm(self.text.lm), self.text.tokenizer, tmp / TEXT_DIR)
            else:
                self.text.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
            model_cfg = self.cfg.model_dump(mode="json")
            if self.cfg.vision.pretrained:
                self.vision.save_pretrained_vit(tmp / VISION_DIR)
                model_cfg["vision"]["pretrained"] = VISION_DIR  # relative to the model folder
            save_file(self._head_state(), str(tmp / WEIGHTS_FILE))
            meta = {"mpe_version": __version__, "model": model_cfg, "provenance": self.provenance}
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype=torch.float32) -> MultiPromptCLIP:
        """Load a folder written by :meth:`save_pretrained` (safetensors only; nothing is unpickled)."""
        path = Path(path)
        meta_file = path / CONFIG_FILE
        if not meta_file.exists():
            raise FileNotFoundError(f"{path} is not an mpe model folder: {CONFIG_FILE} is missing")
        try:
            meta = json.loads(meta_file.read_text())
            model_cfg = meta["model"]
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(
                f"{meta_file}: not an mpe model config ({type(err).__name__}: {err}); "
                "the folder is damaged: save or download the model again"
            ) from None
        if isinstance(model_cfg, dict) and (model_cfg.get("vision") or {}).get("pretrained"):
            model_cfg = {**model_cfg, "vision": {**model_cfg["vision"], "pretrained": str(path / VISION_DIR)}}
        cfg = validate(ModelConfig, model_cfg, str(meta_file))
        if cfg.text.pooling == "vanilla_clip":
            from transformers import AutoTokenizer

            text = VanillaCLIPTextTower(
                AutoTokenizer.from_pretrained(path / TOKENIZER_DIR), cfg.text.vanilla, cfg.embed_dim
            )
        else:
            lm, tok = load_lm(path / TEXT_DIR, cfg.text.attn_implementation, dtype)
            text = LLMTextTower(lm, tok, cfg.text, cfg.embed_dim)
        model = cls(cfg, text, VisionTower(cfg.vision, cfg.embed_dim), meta.get("provenance"))
        try:
            state = load_file(str(path / WEIGHTS_FILE))
        except Exception as err:  # SafetensorError: truncated or not safetensors
            raise ConfigError(
                f"{path / WEIGHTS_FILE}: unreadable weights ({err}); the folder is damaged: "
                "save or download the model again"
            ) from None
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # a tensor of another shape: the config was edited, or comes from another model
            mismatch = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
            raise ConfigError(
                f"{path / WEIGHTS_FILE}: does not fit {meta_file} ({mismatch[:300]}): the config's 'model' "
                "section (embed_dim, text, vision) differs from the one the weights were saved with; restore "
                "the folder's config or save the model again"
            ) from None
        missing = [k for k in missing if not model._separate(k)]
        if missing or unexpected:
            raise ConfigError(
                f"{path / WEIGHTS_FILE}: does not fit {path / CONFIG_FILE} (missing keys {missing[:5]}, "
                f"unexpected keys {unexpected[:5]}): the folder mixes two models; save it again"
            )
        return model.to(dtype).eval()


def _merged_lm(lm: nn.Module) -> nn.Module:
    """``lm`` itself, or a plain copy with LoRA deltas merged into the base weights."""
    if not any("lora_" in n for n, _ in lm.named_parameters()):
        return lm
    from peft.tuners.lora import LoraLayer

    state = {}
    for name, mod in lm.named_modules():
        if isinstance(mod, LoraLayer):
            base = mod.get_base_layer()
            merged = base.weight.detach() + sum(mod.get_delta_weight(a).detach() for a in mod.active_adapters)
            state[f"{name}.weight"] = merged
            if getattr(base, "bias", None) is not None:
                state[f"{name}.bias"] = base.bias.detach()
    for k, v in lm.state_dict().items():
        if "lora_" in k:
            continue
        plain = k.replace(".base_layer.", ".")
        state.setdefault(plain, v)

    class _Plain:  # what save_plain_lm reads: a config and a state dict
        config = lm.config

        @staticmethod
        def state_dict():
            return state

    return _Plain()
