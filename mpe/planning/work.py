"""The model's work per sample, counted from its configuration: FLOPs of the frozen trunk for one caption
(the cache stage), of a training step's forward and backward per sample, and of the evaluation passes.

Nothing is taken from a paper: the model is built on the meta device from the base LLM's ``config.json``
and mpe's own ``ModelConfig`` (no weights are read or allocated), and torch's ``FlopCounterMode`` counts
the very code the stages run (``LLMTextTower.trunk``, ``text_from_cache``, ``model_loss`` and backward).
A transformer pass's FLOPs are a quadratic in the sequence length (projections linear, attention scores
quadratic): three counts give the trunk's polynomial exactly, and any caption length is then summed in
closed form.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mpe.model.configuration import ModelConfig, VisionConfig


@dataclass(frozen=True)
class ModelWork:
    """FLOPs of the model's passes. ``trunk_poly`` = (a, b, c): one caption of ``n`` tokens through the
    trunk costs ``a + b·T + c·T²`` FLOPs with ``T = n + prompt_rows`` (its caption and prompt rows)."""

    trunk_poly: tuple[float, float, float]
    prompt_rows: int
    hidden: int
    layers: int
    trunk_layers: int
    train_flops_per_sample: float  # forward + backward of a training step, per sample (cached trunk)
    train_flops_at_tokens: int  # the caption length that count was made at
    eval_text_flops: float  # the top and projections for one caption (forward, cached trunk)
    eval_image_flops: float  # the vision tower for one image (forward)

    def trunk_flops(self, caption_tokens: float) -> float:
        a, b, c = self.trunk_poly
        t = caption_tokens + self.prompt_rows
        return a + b * t + c * t * t

    def trunk_flops_sum(self, n: int, sum_tokens: float, sum_tokens_sq: float) -> float:
        """The trunk FLOPs of ``n`` captions whose token counts sum to ``sum_tokens`` and whose squares sum
        to ``sum_tokens_sq`` (exact, by the polynomial)."""
        a, b, c = self.trunk_poly
        r = self.prompt_rows
        sum_t = sum_tokens + n * r
        sum_t2 = sum_tokens_sq + 2 * r * sum_tokens + n * r * r
        return a * n + b * sum_t + c * sum_t2


def _count(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def _meta_model(lm_config, tokenizer, model: ModelConfig):
    from transformers import AutoModelForCausalLM

    from mpe.model.multi_prompt_clip import MultiPromptCLIP
    from mpe.model.text.tower import LLMTextTower
    from mpe.model.vision.tower import VisionTower

    # A pretrained vision tower's sizes are in the config already; its weights are not needed to count.
    vision = VisionConfig(**{**model.vision.model_dump(), "pretrained": None, "freeze": False})
    lm_config = copy.deepcopy(lm_config)
    lm_config.vocab_size = max(lm_config.vocab_size, len(tokenizer))  # room for the APT tokens
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(lm_config, attn_implementation=model.text.attn_implementation)
        tower = LLMTextTower(lm, tokenizer, model.text, model.embed_dim)
        clip = MultiPromptCLIP(model, tower, VisionTower(vision, model.embed_dim))
    if model.vision.freeze and model.vision.pretrained:
        clip.vision.vit.requires_grad_(False)
        clip.vision.frozen = True
    return clip


def count_model_work(lm_config, tokenizer, model: ModelConfig, train_tokens: int, batch: int) -> ModelWork:
    """Count the FLOPs of ``model`` on the LLM of ``lm_config`` (a transformers config) with ``tokenizer``
    (the APT tokens added). The training step is counted for ``batch`` samples of ``train_tokens`` caption
    tokens on one worker (the loss against that local batch)."""
    import torch.fx.experimental._config as fx_config

    from mpe.model.objective import model_loss, text_from_cache
    from mpe.model.text.prompt_sequence import build_batch

    clip = _meta_model(lm_config, tokenizer, model)
    tower = clip.text
    rows = tower.layout.segments_len
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0

    def trunk_at(n: int) -> float:
        batch = build_batch([[start] + [100] * (n - 1)], tower.layout, 0).to("meta")
        return _count(lambda: tower.trunk(batch))

    # three lengths fix the quadratic a + b·T + c·T² (T = caption + prompt rows)
    ns = (1, 9, 33)
    ts = [n + rows for n in ns]
    fs = [trunk_at(n) for n in ns]
    c = ((fs[2] - fs[0]) / (ts[2] - ts[0]) - (fs[1] - fs[0]) / (ts[1] - ts[0])) / (ts[2] - ts[1])
    b = (fs[1] - fs[0]) / (ts[1] - ts[0]) - c * (ts[0] + ts[1])
    a = fs[0] - b * ts[0] - c * ts[0] ** 2

    size = clip.vision.image_size
    states = torch.empty(batch, train_tokens + rows, tower.decoder.hidden_size, device="meta")
    pixels = torch.empty(batch, 3, size, size, device="meta")
    clip.train()

    def step():
        terms = model_loss(clip, pixels, text_from_cache(clip, states, [train_tokens] * batch))
        terms.total.backward()

    # the diversity loss indexes with a boolean mask, which the meta device sizes only when told to assume
    # every element set (the count is then a few FLOPs high: K² instead of K(K-1) cosines per sample)
    old = fx_config.meta_nonzero_assume_all_nonzero
    fx_config.meta_nonzero_assume_all_nonzero = True
    try:
        train = _count(step)
    finally:
        fx_config.meta_nonzero_assume_all_nonzero = old
    clip.eval()
    with torch.no_grad():
        text = _count(lambda: text_from_cache(clip, states[:1], [train_tokens]))
        image = _count(lambda: clip.vision(pixels[:1]))
    return ModelWork(
        trunk_poly=(a, b, c),
        prompt_rows=rows,
        hidden=tower.decoder.hidden_size,
        layers=tower.decoder.num_layers,
        trunk_layers=tower.cut,
        train_flops_per_sample=train / batch,
        train_flops_at_tokens=train_tokens,
        eval_text_flops=text,
        eval_image_flops=image,
    )


def load_lm_config(folder: str | Path, trust_remote_code: bool = False):
    """A base LLM's transformers config from its folder (``config.json``; no weights are read)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)


def model_source(base_model, text, model_config: str | Path | None = None):
    """``(transformers config, tokenizer with the APT tokens, how)`` of the LLM to plan for: ``model_config``
    (a folder or its ``config.json``) when given, else the prepared base model (``base_model.out_dir``), else
    ``base_model.name`` resolved as the base-model stage resolves it. A folder without a tokenizer (a bare
    ``config.json``) is read with the bundled SmolLM2 tokenizer, and ``how`` says so: token counts then
    follow that tokenizer, not the model's own."""
    from transformers import AutoTokenizer

    from mpe.model.base_model import resolve_base_model
    from mpe.model.text.apt_tokens import apt_tokens

    if model_config is not None:
        folder = Path(model_config)
        folder = folder.parent if folder.is_file() else folder
        how = f"config: {folder}"
    elif (Path(base_model.out_dir) / "config.json").exists():
        folder, how = Path(base_model.out_dir), f"the prepared base model in {base_model.out_dir}"
    else:
        folder = resolve_base_model(base_model.name, base_model.revision, base_model.save_dtype)
        how = f"base model {base_model.name}"
    config = load_lm_config(folder, base_model.trust_remote_code)
    if any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=base_model.trust_remote_code)
    else:
        tok = AutoTokenizer.from_pretrained(resolve_base_model("smollm2-135m"))
        how += " (no tokenizer there: token counts by the bundled SmolLM2 tokenizer)"
    if text.uses_apt:
        missing = [t for t in apt_tokens(text.num_prompts) if t not in tok.get_vocab()]
        if missing:
            tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return config, tok, how
