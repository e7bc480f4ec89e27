"""Typed configuration: every ``params.yaml`` section is a pydantic model validated on load.

Errors name the file and the dotted key (``params.yaml: model.text.num_prompts: ...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


# A pretrained vision tower's model_type (config.json) and the VisionConfig field each checkpoint key sets.
PRETRAINED_VISION_TYPES = ("siglip", "siglip_vision_model", "clip", "clip_vision_model")
CHECKPOINT_VISION_FIELDS = {"image_size": "image_size", "patch_size": "patch_size", "hidden_size": "hidden_size",
                            "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                            "intermediate_size": "intermediate_size"}


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
        raise ValueError(f"{cfg_file}: model_type {kind!r} is not a supported vision tower "
                         f"(supported: {', '.join(PRETRAINED_VISION_TYPES)})")
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


class VisionConfig(_Strict):
    """The vision tower: a SigLIP-style ViT with the MAP attention-pooling head trained from scratch
    (transformers ``SiglipVisionModel``), or a local pretrained SigLIP / CLIP checkpoint (``pretrained``).

    With ``pretrained`` the checkpoint defines the architecture: the six size fields are read from it
    (leave them out; an explicit value that differs from the checkpoint's is an error) and the images
    are prepared by its own processor config.
    """

    image_size: int = Field(64, ge=8)
    patch_size: int = Field(8, ge=1)
    hidden_size: int = Field(192, gt=0)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(3, ge=1)
    intermediate_size: int = Field(768, gt=0)
    pretrained: str | None = Field(None, description="a local Hugging Face SigLIP or CLIP checkpoint folder "
                                                     "(vision-only or full); None: train a ViT from scratch")
    freeze: bool = Field(False, description="pretrained only: keep the ViT fixed and train only the projection "
                                            "to the joint embedding (LiT)")

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
        clash = [f"{f} is {data[f]!r} but the checkpoint has {v!r}" for f, v in found.items()
                 if f in data and data[f] != v]
        if clash:
            raise ValueError(f"{'; '.join(clash)} ({data['pretrained']}): leave these keys out with pretrained, "
                             "the checkpoint defines them")
        return {**data, **found}

    @field_validator("pretrained")
    @classmethod
    def _readable(cls, folder: str | None) -> str | None:
        if folder is not None:
            read_vision_checkpoint(folder)
        return folder

    @model_validator(mode="after")
    def _check(self) -> "VisionConfig":
        if self.freeze and not self.pretrained:
            raise ValueError("freeze needs a pretrained tower (model.vision.pretrained)")
        if self.pretrained:
            return self  # the checkpoint's own geometry
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

    @field_validator("storage_path")
    @classmethod
    def _a_shared_folder(cls, v: str) -> str:
        # Ray writes the checkpoints, but mpe resumes from the run folder (mpe.train_worker._restore).
        if "://" in v:
            raise ValueError(f"{v!r} is a URL: use a folder that every Ray node mounts at the same path "
                             "(NFS, a cluster file system)")
        return v


class _Benchmark(_Strict):
    """One standard benchmark read from local files; ``name`` prefixes its metric keys (``<name>.<metric>``)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="used in metric keys: letters, digits, _ and -")
    path: str


class KarpathyBenchmark(_Benchmark):
    """Flickr30k / MSCOCO in Karpathy's JSON (``dataset_flickr30k.json``, ``dataset_coco.json``)."""

    kind: Literal["karpathy"]
    image_root: str | None = Field(None, description="image folder (COCO: holding filepath/); default the JSON's folder")
    split: str = "test"


class ClipBenchmarkWds(_Benchmark):
    """CLIP_benchmark's webdataset retrieval layout: ``path/<split>/nshards.txt`` and ``0.tar`` …"""

    kind: Literal["clip_benchmark_wds"]
    split: str = "test"


class ImageFolderBenchmark(_Benchmark):
    """Zero-shot classification over ``path/<class>/*.jpg`` (torchvision ImageFolder layout)."""

    kind: Literal["image_folder"]
    classnames: str | None = Field(None, description="a .json {folder: name} or a .txt of names in sorted folder order")
    templates: list[str] = Field(["a photo of a {c}."], min_length=1, description="'{c}' is the class name")
    templates_file: str | None = Field(None, description="one template per line; replaces templates")
    top_k: list[int] = Field([1, 5], min_length=1, description="accuracies reported (k above the class count: left out)")

    @model_validator(mode="after")
    def _check(self) -> "ImageFolderBenchmark":
        bad = [t for t in self.templates if "{c}" not in t]
        if bad:
            raise ValueError(f"every template must contain '{{c}}' (the class name): {bad}")
        if any(k < 1 for k in self.top_k):
            raise ValueError("top_k entries must be >= 1")
        return self


class NegBenchMcq(_Benchmark):
    """NegBench's multiple-choice CSV: ``image_path``, ``caption_0`` … ``caption_N``, ``correct_answer``."""

    kind: Literal["negbench_mcq"]
    image_root: str | None = Field(None, description="relative image paths start here; default the CSV's folder")


Benchmark = Annotated[Union[KarpathyBenchmark, ClipBenchmarkWds, ImageFolderBenchmark, NegBenchMcq],
                      Field(discriminator="kind")]


class EvalConfig(_Strict):
    out_dir: str = "metrics"
    plots_dir: str = "plots"
    batch_size: int = Field(64, ge=1)
    ks: list[int] = [1, 5, 10]
    compare_untrained: bool = True
    splits: list[Literal["test", "val"]] = Field(["test"], description="splits evaluated (val: for choices)")
    benchmarks: list[Benchmark] = Field([], description="standard benchmarks from local files (README)")

    @model_validator(mode="after")
    def _check(self) -> "EvalConfig":
        names = [b.name for b in self.benchmarks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"benchmark names must be unique (they prefix metric keys): {dup}")
        return self


class RegisterConfig(_Strict):
    """MLflow model registry and the promotion gate."""

    model_name: str = "mpe-multiprompt"
    gate_metric: str = Field("mean_recall", description="mean_recall (the test split's R@k), or a key of "
                                                        "metrics/eval.json's 'trained' (a benchmark's: <name>.<metric>)")
    margin: float = Field(0.005, ge=0)
    gate_wait_s: float = Field(900, gt=0, description="how long the gate waits for an earlier registration's "
                               "decision before taking that registration as abandoned")


class DvcConfig(_Strict):
    remote: str = "localremote"
    push: bool = True


class ScheduleConfig(_Strict):
    cron: str = "0 2 * * *"
    deployment: str = "nightly"


class ServeConfig(_Strict):
    """``mpe serve``: where it listens and what one request may hold (the CLI options override these)."""

    host: str = Field("127.0.0.1", description="interface to bind; 0.0.0.0 exposes the model to the network")
    port: int = Field(8000, ge=1, le=65535)
    max_body_mb: float = Field(16.0, gt=0, description="request body limit (413 above it)")
    max_rows: int = Field(256, ge=1, description="rows per request")
    max_caption_chars: int = Field(2000, ge=1, description="longer captions are refused (400), not truncated")


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
    serve: ServeConfig = ServeConfig()

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
