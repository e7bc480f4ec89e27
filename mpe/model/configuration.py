"""The model's configuration, apart from the pipeline's params (as transformers keeps ``configuration_*``
apart from ``modeling_*``): the text tower and how captions are read, the vision tower (from scratch or a
local pretrained checkpoint, whose ``config.json`` is read here), the losses, and ``ModelConfig``, which
``MultiPromptCLIP`` saves beside its weights. Also the strict base every typed config of mpe derives from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mpe.errors import ConfigError


class StrictConfig(BaseModel):
    """A typed config: unknown keys are refused by name, values are validated and frozen; a float is finite
    (``.inf`` epochs or a NaN learning rate is refused by its key, not trained on)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


Pooling = Literal["multi_prompt", "mean", "last_token", "prompt_last_token", "defo", "vanilla_clip"]
APT_POOLINGS = ("multi_prompt", "defo")  # the poolings that read the LLM through <APT-i> tokens


class VanillaTextConfig(StrictConfig):
    """The small CLIP text transformer trained from scratch (baseline ``vanilla_clip``)."""

    width: int = Field(256, gt=0, description="width of the from-scratch CLIP text transformer (pooling vanilla_clip)")
    layers: int = Field(4, gt=0, description="its layers")
    heads: int = Field(4, gt=0, description="its attention heads")
    context_length: int = Field(77, gt=1, description="its longest caption in tokens")


class TextConfig(StrictConfig):
    """The LLM text tower and how captions are read through it (docs/METHOD.md)."""

    pooling: Pooling = Field(
        "multi_prompt",
        description="how a caption becomes one vector: multi_prompt (the method) or a baseline (docs: The method)",
    )
    num_prompts: int = Field(4, ge=1, description="K adaptive prompts (M APT tokens for defo)")
    prompt_template: str = Field(
        " the {apt} of the image means:", description="the adaptive prompt after the caption; {apt} becomes <APT-i>"
    )
    negated_template: str = Field(
        " the {apt} of the image does not mean:",
        description="the negated prompt (negation loss); {apt} becomes <APT-i>",
    )
    fixed_prompt: str = Field(" this image means:", description="the one fixed prompt of pooling prompt_last_token")
    negation: bool = Field(
        True, description="read every caption through negated prompts too (the negation loss's hard negatives)"
    )
    max_caption_tokens: int = Field(64, ge=1, description="captions are cut to this many tokens")
    n_top: int = Field(1, ge=1, description="trained top decoder layers; the rest is the frozen trunk")
    tuning: Literal["top", "lora"] = Field(
        "top",
        description="top: train the top n_top layers over a frozen (cacheable) trunk; lora: LoRA on "
        "every layer (cache off)",
    )
    lora_rank: int = Field(8, ge=1, description="LoRA rank (tuning: lora)")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha (tuning: lora)")
    train_apt_embeddings: bool = Field(
        False, description="train the APT token embeddings too (needs cache.enabled: false)"
    )  # must stay off when the trunk is cached
    attn_implementation: Literal["eager", "sdpa"] = Field(
        "sdpa", description="transformers attention implementation of the LLM"
    )
    apt_init_seed: int = Field(0, description="seed of the APT rows, drawn at the embedding matrix's scale")
    vanilla: VanillaTextConfig = VanillaTextConfig()

    @model_validator(mode="after")
    def _check(self) -> TextConfig:
        for name in ("prompt_template", "negated_template"):
            if "{apt}" not in getattr(self, name):
                raise ValueError(f"{name} must contain the placeholder '{{apt}}'")
        if self.negation and self.pooling != "multi_prompt":
            raise ValueError("negation needs pooling 'multi_prompt' (negated prompts carry APT tokens)")
        if self.pooling in ("mean", "last_token", "prompt_last_token", "vanilla_clip") and self.num_prompts != 1:
            raise ValueError(f"pooling '{self.pooling}' reads one embedding: set num_prompts: 1")
        return self

    @property
    def uses_apt(self) -> bool:
        return self.pooling in APT_POOLINGS


# A pretrained vision tower's model_type (config.json) and the VisionConfig field each checkpoint key sets.
PRETRAINED_VISION_TYPES = ("siglip", "siglip_vision_model", "clip", "clip_vision_model")
CHECKPOINT_VISION_FIELDS = {
    "image_size": "image_size",
    "patch_size": "patch_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
}


def read_vision_checkpoint(folder: str | Path):
    """The transformers vision config (``SiglipVisionConfig`` / ``CLIPVisionConfig``) of a local SigLIP or
    CLIP checkpoint folder, vision-only or a full two-tower one; ``ValueError`` naming the folder otherwise.

    Only local files are read: nothing is downloaded and no remote code runs.
    """
    import json

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder (a local Hugging Face SigLIP or CLIP checkpoint)")
    cfg_file = folder / "config.json"
    try:
        raw = json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{cfg_file}: missing: not a Hugging Face checkpoint folder") from None
    except ValueError as err:
        raise ValueError(f"{cfg_file}: not valid JSON ({err})") from None
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    if kind not in PRETRAINED_VISION_TYPES:
        raise ValueError(
            f"{cfg_file}: model_type {kind!r} is not a supported vision tower "
            f"(supported: {', '.join(PRETRAINED_VISION_TYPES)})"
        )
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    vision_cls = SiglipVisionConfig if kind.startswith("siglip") else CLIPVisionConfig
    if kind in ("siglip", "clip"):  # a full two-tower checkpoint: its vision part
        if not isinstance(raw.get("vision_config"), dict):
            raise ValueError(f"{cfg_file}: model_type {kind!r} without a vision_config")
        raw = raw["vision_config"]
    if not (folder / "preprocessor_config.json").is_file():
        raise ValueError(f"{folder}: no preprocessor_config.json (the checkpoint's image preprocessing)")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"{folder}: no *.safetensors weights (other weight formats are not read)")
    return vision_cls.from_dict({k: v for k, v in raw.items() if k != "model_type"})


class VisionConfig(StrictConfig):
    """The vision tower: a SigLIP-style ViT with the MAP attention-pooling head trained from scratch
    (transformers ``SiglipVisionModel``), or a local pretrained SigLIP / CLIP checkpoint (``pretrained``).

    With ``pretrained`` the checkpoint defines the architecture: the six size fields are read from it
    (leave them out; an explicit value that differs from the checkpoint's is an error) and the images
    are prepared by its own processor config.
    """

    image_size: int = Field(
        64, ge=8, description="input size in pixels (from scratch; read from the checkpoint with pretrained)"
    )
    patch_size: int = Field(8, ge=1, description="ViT patch size in pixels")
    hidden_size: int = Field(192, gt=0, description="ViT width")
    num_layers: int = Field(4, ge=1, description="ViT layers")
    num_heads: int = Field(3, ge=1, description="ViT attention heads")
    intermediate_size: int = Field(768, gt=0, description="ViT MLP width")
    stem: Literal["patch", "conv"] = Field(
        "patch",
        description="from scratch only: the patch embedding (one linear map per patch) or a convolutional stem "
        "(mpe.model.vision.stem) giving the same token grid",
    )
    pretrained: str | None = Field(
        None,
        description="a local Hugging Face SigLIP or CLIP checkpoint folder "
        "(vision-only or full); None: train a ViT from scratch",
    )
    freeze: bool = Field(
        False,
        description="pretrained only: keep the ViT fixed and train only the projection to the joint embedding (LiT)",
    )

    @model_validator(mode="before")
    @classmethod
    def _sizes_from_checkpoint(cls, data: Any) -> Any:
        """Fill the size fields from the checkpoint; refuse an explicit value that contradicts it."""
        if not isinstance(data, dict) or not data.get("pretrained"):
            return data
        try:
            ckpt = read_vision_checkpoint(data["pretrained"])
        except (ValueError, OSError):
            return data  # reported with its key by the field validator below
        found = {field: getattr(ckpt, key) for field, key in CHECKPOINT_VISION_FIELDS.items()}
        clash = [
            f"{f} is {data[f]!r} but the checkpoint has {v!r}" for f, v in found.items() if f in data and data[f] != v
        ]
        if clash:
            raise ValueError(
                f"{'; '.join(clash)} ({data['pretrained']}): leave these keys out with pretrained, "
                "the checkpoint defines them"
            )
        return {**data, **found}

    @field_validator("pretrained")
    @classmethod
    def _readable(cls, folder: str | None) -> str | None:
        if folder is not None:
            read_vision_checkpoint(folder)
        return folder

    @model_validator(mode="after")
    def _check(self) -> VisionConfig:
        if self.freeze and not self.pretrained:
            raise ValueError("freeze needs a pretrained tower (model.vision.pretrained)")
        if self.pretrained:
            if self.stem != "patch":
                raise ValueError("stem 'conv' is for a tower trained from scratch, not a pretrained one")
            return self  # the checkpoint's own geometry
        if self.stem == "conv" and self.patch_size & (self.patch_size - 1):
            raise ValueError(f"stem 'conv' needs a power-of-two patch_size, got {self.patch_size}")
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        return self


class LossConfig(StrictConfig):
    """``L = L_con + lambda_div * L_div + lambda_neg * L_neg``."""

    kind: Literal["clip", "siglip"] = Field(
        "clip", description="clip: softmax InfoNCE; siglip: sigmoid loss with a learned bias"
    )
    init_logit_scale: float | None = Field(None, gt=0, description="default 1/0.07 (clip) or 10 (siglip)")
    max_logit_scale: float = Field(100.0, gt=0, description="cap of the learned logit scale")
    init_logit_bias: float = Field(-10.0, description="initial bias of the sigmoid loss (siglip)")
    lambda_div: float = Field(0.1, ge=0, description="weight of the diversity loss between the K prompt pieces")
    lambda_neg: float = Field(1.0, ge=0, description="weight of the negation loss (0 drops the negated prompts)")

    @property
    def initial_logit_scale(self) -> float:
        if self.init_logit_scale is not None:
            return self.init_logit_scale
        return 1 / 0.07 if self.kind == "clip" else 10.0


class VideoConfig(StrictConfig):
    """How a clip becomes one embedding (CLIP4Clip): ``num_frames`` frames sampled uniformly over the clip, each
    through the vision tower, then pooled over time: ``mean`` of the normalised frame embeddings (meanP, no
    weights), or a small ``transformer`` over them with frame position embeddings and a residual (seqTransf)."""

    num_frames: int = Field(8, ge=1, description="frames sampled uniformly per clip (12 is MSR-VTT's standard)")
    pooling: Literal["mean", "transformer"] = Field(
        "mean", description="mean of the frame embeddings (meanP), or a temporal transformer over them (seqTransf)"
    )
    layers: int = Field(2, ge=1, description="transformer pooling: encoder layers")
    heads: int = Field(4, ge=1, description="transformer pooling: attention heads (embed_dim must divide by it)")


class ModelConfig(StrictConfig):
    """Everything that defines a MultiPromptCLIP architecture."""

    embed_dim: int = Field(
        256, gt=0, description="D, the joint embedding's dimension (K pieces of D/K with multi_prompt)"
    )
    text: TextConfig = TextConfig()
    vision: VisionConfig = VisionConfig()
    video: VideoConfig = VideoConfig()
    loss: LossConfig = LossConfig()

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        k = self.text.num_prompts
        if self.embed_dim % k:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by text.num_prompts ({k})")
        if self.video.pooling == "transformer" and self.embed_dim % self.video.heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by video.heads ({self.video.heads})")
        return self


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        lines.append(f"{source}: {key}: {e['msg']}")
    return "\n".join(lines)


def validate(model_cls: type[BaseModel], data: dict[str, Any], source: str) -> Any:
    """Validate ``data`` into ``model_cls``; raise :class:`ConfigError` naming ``source`` and the keys."""
    try:
        return model_cls.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
