"""Typed configuration: every ``params.yaml`` section is a pydantic model validated on load.

Errors name the file and the dotted key (``params.yaml: model.text.num_prompts: ...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mpe.errors import ConfigError

Pooling = Literal["multi_prompt", "mean", "last_token", "prompt_last_token", "defo", "vanilla_clip"]
APT_POOLINGS = ("multi_prompt", "defo")  # the poolings that read the LLM through <APT-i> tokens


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class VanillaTextConfig(_Strict):
    """The small CLIP text transformer trained from scratch (baseline ``vanilla_clip``)."""

    width: int = Field(256, gt=0)
    layers: int = Field(4, gt=0)
    heads: int = Field(4, gt=0)
    context_length: int = Field(77, gt=1)


class TextConfig(_Strict):
    """The LLM text tower and how captions are read through it (docs/METHOD.md)."""

    pooling: Pooling = "multi_prompt"
    num_prompts: int = Field(4, ge=1, description="K adaptive prompts (M APT tokens for defo)")
    prompt_template: str = " the {apt} of the image means:"
    negated_template: str = " the {apt} of the image does not mean:"
    fixed_prompt: str = " this image means:"
    negation: bool = True
    max_caption_tokens: int = Field(64, ge=1)
    n_top: int = Field(1, ge=1, description="trained top decoder layers; the rest is the frozen trunk")
    tuning: Literal["top", "lora"] = "top"
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    train_apt_embeddings: bool = False  # must stay off when the trunk is cached
    attn_implementation: Literal["eager", "sdpa"] = "sdpa"
    apt_init_seed: int = 0
    vanilla: VanillaTextConfig = VanillaTextConfig()

    @model_validator(mode="after")
    def _check(self) -> "TextConfig":
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


class VisionConfig(_Strict):
    """SigLIP-style ViT with the MAP attention-pooling head (transformers ``SiglipVisionModel``)."""

    image_size: int = Field(64, ge=8)
    patch_size: int = Field(8, ge=1)
    hidden_size: int = Field(192, gt=0)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(3, ge=1)
    intermediate_size: int = Field(768, gt=0)
    pretrained: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "VisionConfig":
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        return self


class LossConfig(_Strict):
    """``L = L_con + lambda_div * L_div + lambda_neg * L_neg``."""

    kind: Literal["clip", "siglip"] = "clip"
    init_logit_scale: float | None = Field(None, gt=0, description="default 1/0.07 (clip) or 10 (siglip)")
    max_logit_scale: float = Field(100.0, gt=0)
    init_logit_bias: float = -10.0
    lambda_div: float = Field(0.1, ge=0)
    lambda_neg: float = Field(1.0, ge=0)

    @property
    def initial_logit_scale(self) -> float:
        if self.init_logit_scale is not None:
            return self.init_logit_scale
        return 1 / 0.07 if self.kind == "clip" else 10.0


class ModelConfig(_Strict):
    """Everything that defines a MultiPromptCLIP architecture."""

    embed_dim: int = Field(256, gt=0)
    text: TextConfig = TextConfig()
    vision: VisionConfig = VisionConfig()
    loss: LossConfig = LossConfig()

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        k = self.text.num_prompts
        if self.embed_dim % k:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by text.num_prompts ({k})")
        return self


class BaseModelConfig(_Strict):
    """Which pretrained LLM to start from."""

    name: str = "smollm2-135m"
    revision: str | None = None
    trust_remote_code: bool = False
    save_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    out_dir: str = "models/base"


class ShapesConfig(_Strict):
    """Sizes of the synthetic shapes world."""

    train_captions: int = Field(500, ge=1)
    images_per_caption: int = Field(4, ge=1)
    val_captions: int = Field(0, ge=0)
    test_captions: int = Field(150, ge=2)
    negation_queries: int = Field(80, ge=0)
    held_out_pairs: int = Field(6, ge=0, le=48)
    p_secondary: float = Field(0.6, ge=0, le=1)
    aspect_probes: int = Field(0, ge=0, description="test captions given one-aspect-changed variants (per-prompt analysis)")


IMG2DATASET_DISALLOWED = ["noai", "noimageai", "noindex", "noimageindex"]  # img2dataset's own default


class MetadataFilterConfig(_Strict):
    """Filters on LAION's metadata columns, applied to a URL list before anything is downloaded; ``null``
    leaves a filter off. A filter set on a list without its column is an error naming the file."""

    min_similarity: float | None = Field(None, description="lowest CLIP image-text similarity (column similarity)")
    max_punsafe: float | None = Field(None, ge=0, le=1, description="highest NSFW probability (column punsafe)")
    max_pwatermark: float | None = Field(None, ge=0, le=1, description="highest watermark probability (pwatermark)")
    min_image_size: int | None = Field(None, ge=1, description="smallest min(WIDTH, HEIGHT) in pixels")
    max_aspect_ratio: float | None = Field(None, ge=1, description="largest max(WIDTH, HEIGHT) / min(WIDTH, HEIGHT)")


class DataConfig(_Strict):
    """Where images and captions come from and how img2dataset downloads them."""

    source: Literal["shapes", "url_list"] = "shapes"
    url_list: str | None = Field(None, description="parquet or csv with a URL and a caption column, or a folder "
                                                  "or glob of parts (each part is downloaded once, on its own)")
    url_col: str = "URL"
    caption_col: str = "TEXT"
    encoding: str = Field("utf-8", description="text encoding of a CSV/TSV URL list")
    test_fraction: float = Field(0.02, gt=0, lt=1, description="url_list only: rows kept for evaluation, chosen "
                                                                "by a hash of the URL (stable as parts are added)")
    filters: MetadataFilterConfig = MetadataFilterConfig()
    out_dir: str = "data"
    image_size: int = Field(64, ge=8)
    samples_per_shard: int = Field(500, ge=1)
    processes: int = Field(1, ge=1)
    threads: int = Field(16, ge=1)
    distributor: Literal["multiprocessing", "ray", "pyspark"] = "multiprocessing"
    timeout: int = Field(10, ge=1)
    retries: int = Field(0, ge=0)
    min_success_rate: float = Field(0.9, ge=0, le=1, description="of all rows of the run; below it the stage stops")
    max_image_area: float = Field(4e7, gt=0, description="decoded images of more pixels are dropped "
                                                         "(img2dataset's 'image area too large')")
    disallowed_header_directives: list[str] = Field(
        IMG2DATASET_DISALLOWED, description="X-Robots-Tag directives that exclude an image; [] honours none")
    skip_corrupt_shards: bool = Field(False, description="leave out (and count) shards whose size differs from "
                                                          "what the data stage recorded, instead of stopping")
    shapes: ShapesConfig = ShapesConfig()

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.source == "url_list" and not self.url_list:
            raise ValueError("source 'url_list' needs url_list: a parquet or csv path")
        return self


class CacheConfig(_Strict):
    """The trunk hidden-state cache."""

    enabled: bool = True
    root: str = Field("cache", description="a folder or any fsspec URL (s3://…) every node reads")
    dtype: Literal["float16", "bfloat16", "float32", "float8_e4m3_row", "float8_e4m3_tensor"] = Field(
        "float16", description="storage; float8 is e4m3 scaled per row or per tensor")
    batch_size: int = Field(32, ge=1)
    autocast: Literal["auto", "bfloat16", "none"] = Field(
        "auto", description="auto: bf16 autocast on GPU, and on a CPU where a start-up probe finds bf16 faster")
    engine: Literal["local", "ray"] = "local"
    ray_actors: int = Field(1, ge=1)
    gpus_per_actor: float = Field(0, ge=0)
    warn_gb: float = Field(500.0, gt=0, description="warn before caching more than this many GB")


class MlflowConfig(_Strict):
    tracking_uri: str = "sqlite:///mlruns.db"
    artifact_root: str = "mlartifacts"
    experiment: str = "mpe"
    tags: dict[str, str] = Field({}, description="extra tags on the training run (experiment suites set them)")


class RayConfig(_Strict):
    address: str | None = Field(None, description="None: start a local cluster; 'auto' or ray://host:10001")
    num_cpus: int | None = 2


class TrainConfig(_Strict):
    """Ray Train (TorchTrainer) settings and the optimisation schedule."""

    run_name: str = "mpe-default"
    storage_path: str = "ray_results"
    out_dir: str = "models/trained"
    init_from: Literal["scratch", "champion"] = Field(
        "scratch", description="scratch: a run is reproducible from its DVC inputs alone; champion: continue "
                               "from the registry's @champion's trainable weights (cheaper at scale)")
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    batch_size: int = Field(64, ge=2, description="per worker")
    shuffle_buffer: int = Field(256, ge=1, description="samples each loader worker draws from at random")
    loader_workers: int = Field(1, ge=0, description="decode processes per Ray worker (0: decode in the worker)")
    log_sample_keys: bool = Field(False, description="write every step's sample keys beside the checkpoints")
    autocast: Literal["auto", "bfloat16", "none"] = Field(
        "auto", description="auto: bf16 autocast on GPU, and on a CPU where a start-up probe finds bf16 faster")
    epochs: float = Field(4.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    fail_at_step: int | None = Field(None, description="testing: one worker raises once at this step")
    log_every: int = Field(5, ge=1)
    save_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    threads_per_worker: int | None = None


class EvalConfig(_Strict):
    out_dir: str = "metrics"
    plots_dir: str = "plots"
    batch_size: int = Field(64, ge=1)
    ks: list[int] = [1, 5, 10]
    compare_untrained: bool = True
    splits: list[Literal["test", "val"]] = Field(["test"], description="splits evaluated (val: for choices)")


class RegisterConfig(_Strict):
    """MLflow model registry and the promotion gate."""

    model_name: str = "mpe-multiprompt"
    gate_metric: str = Field("mean_recall", description="mean_recall, or a key of metrics/eval.json's 'trained'")
    margin: float = Field(0.005, ge=0)


class DvcConfig(_Strict):
    remote: str = "localremote"
    push: bool = True


class ScheduleConfig(_Strict):
    cron: str = "0 2 * * *"
    deployment: str = "nightly"


class Params(_Strict):
    """The whole ``params.yaml``."""

    seed: int = 0
    data: DataConfig = DataConfig()
    base_model: BaseModelConfig = BaseModelConfig()
    model: ModelConfig = ModelConfig()
    cache: CacheConfig = CacheConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvalConfig = EvalConfig()
    mlflow: MlflowConfig = MlflowConfig()
    ray: RayConfig = RayConfig()
    # "register" is the params.yaml key; the attribute name avoids shadowing ABC.register
    registry: RegisterConfig = Field(RegisterConfig(), alias="register")
    dvc: DvcConfig = DvcConfig()
    schedule: ScheduleConfig = ScheduleConfig()

    @model_validator(mode="after")
    def _check(self) -> "Params":
        if self.cache.enabled and self.model.text.train_apt_embeddings:
            raise ValueError("model.text.train_apt_embeddings must be false when cache.enabled: the cached "
                             "trunk already holds the APT embeddings' effect")
        if self.cache.enabled and self.model.text.tuning == "lora":
            raise ValueError("model.text.tuning 'lora' trains every layer: set cache.enabled: false")
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


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return validate(Params, data, str(path))
