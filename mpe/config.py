"""The pipeline's params: every ``params.yaml`` section is a typed, frozen pydantic model validated on load.

Errors name the file and the dotted key (``params.yaml: model.text.num_prompts: ...``). The model's own
architecture (``model:``) is defined in ``mpe.model.configuration``, apart from the pipeline's settings.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from mpe.errors import ConfigError

# The model's own configuration (mpe.model.configuration) is part of the params: re-exported here, so
# ``from mpe.config import ModelConfig`` keeps working.
from mpe.model.configuration import (  # noqa: F401
    APT_POOLINGS,
    LossConfig,
    ModelConfig,
    Pooling,
    StrictConfig,
    TextConfig,
    VanillaTextConfig,
    VisionConfig,
    validate,
)


class BaseModelConfig(StrictConfig):
    """Which pretrained LLM to start from."""

    name: str = "smollm2-135m"
    revision: str | None = None
    trust_remote_code: bool = False
    save_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    out_dir: str = "models/base"


class ShapesConfig(StrictConfig):
    """Sizes of the synthetic shapes world."""

    train_captions: int = Field(500, ge=1)
    images_per_caption: int = Field(4, ge=1)
    val_captions: int = Field(0, ge=0)
    test_captions: int = Field(150, ge=2)
    negation_queries: int = Field(80, ge=0)
    held_out_pairs: int = Field(6, ge=0, le=48)
    p_secondary: float = Field(0.6, ge=0, le=1)
    aspect_probes: int = Field(
        0, ge=0, description="test captions given one-aspect-changed variants (per-prompt analysis)"
    )
    object_scale: float = Field(1.0, gt=0, le=2, description="multiplies every object's radius")
    minimal_pairs: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of training scenes drawn with a twin that differs in one aspect only (one drawn at random)",
    )
    benchmark_items: int = Field(
        0,
        ge=0,
        description="items per category of the world's own SugarCrepe, ARO and Winoground sets (0: none written)",
    )


IMG2DATASET_DISALLOWED = ["noai", "noimageai", "noindex", "noimageindex"]  # img2dataset's own default


class MetadataFilterConfig(StrictConfig):
    """Filters on LAION's metadata columns, applied to a URL list before anything is downloaded; ``null``
    leaves a filter off. A filter set on a list without its column is an error naming the file."""

    min_similarity: float | None = Field(None, description="lowest CLIP image-text similarity (column similarity)")
    max_punsafe: float | None = Field(None, ge=0, le=1, description="highest NSFW probability (column punsafe)")
    max_pwatermark: float | None = Field(None, ge=0, le=1, description="highest watermark probability (pwatermark)")
    min_image_size: int | None = Field(None, ge=1, description="smallest min(WIDTH, HEIGHT) in pixels")
    max_aspect_ratio: float | None = Field(None, ge=1, description="largest max(WIDTH, HEIGHT) / min(WIDTH, HEIGHT)")


class DataConfig(StrictConfig):
    """Where images and captions come from and how img2dataset downloads them."""

    source: Literal["shapes", "url_list"] = "shapes"
    url_list: str | None = Field(
        None,
        description="parquet or csv with a URL and a caption column, or a folder "
        "or glob of parts (each part is downloaded once, on its own)",
    )
    url_col: str = "URL"
    caption_col: str = "TEXT"
    encoding: str = Field("utf-8", description="text encoding of a CSV/TSV URL list")
    test_fraction: float = Field(
        0.02,
        gt=0,
        lt=1,
        description="url_list only: rows kept for evaluation, chosen by a hash of the URL (stable as parts are added)",
    )
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
    max_image_area: float = Field(
        4e7, gt=0, description="decoded images of more pixels are dropped (img2dataset's 'image area too large')"
    )
    disallowed_header_directives: list[str] = Field(
        IMG2DATASET_DISALLOWED, description="X-Robots-Tag directives that exclude an image; [] honours none"
    )
    skip_corrupt_shards: bool = Field(
        False,
        description="leave out (and count) shards whose size differs from "
        "what the data stage recorded, instead of stopping",
    )
    shapes: ShapesConfig = ShapesConfig()

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.source == "url_list" and not self.url_list:
            raise ValueError("source 'url_list' needs url_list: a parquet or csv path")
        return self


class CacheConfig(StrictConfig):
    """The trunk hidden-state cache."""

    enabled: bool = True
    root: str = Field("cache", description="a folder or any fsspec URL (s3://…) every node reads")
    dtype: Literal["float16", "bfloat16", "float32", "float8_e4m3_row", "float8_e4m3_tensor"] = Field(
        "float16", description="storage; float8 is e4m3 scaled per row or per tensor"
    )
    batch_size: int = Field(32, ge=1)
    autocast: Literal["auto", "bfloat16", "none"] = Field(
        "auto", description="auto: bf16 autocast on GPU, and on a CPU where a start-up probe finds bf16 faster"
    )
    engine: Literal["local", "ray"] = "local"
    ray_actors: int = Field(1, ge=1)
    gpus_per_actor: float = Field(0, ge=0)
    warn_gb: float = Field(500.0, gt=0, description="warn before caching more than this many GB")


class MlflowConfig(StrictConfig):
    tracking_uri: str = "sqlite:///mlruns.db"
    artifact_root: str = "mlartifacts"
    experiment: str = "mpe"
    tags: dict[str, str] = Field({}, description="extra tags on the training run (experiment suites set them)")


class RayConfig(StrictConfig):
    address: str | None = Field(None, description="None: start a local cluster; 'auto' or ray://host:10001")
    num_cpus: int | None = 2


class HardNegativesConfig(StrictConfig):
    """Hard-negative captions in training, as NegCLIP (``mpe.data.hard_negatives``): each caption of a batch
    brings ``per_caption`` captions with one aspect replaced or two attributes swapped, as more negatives of
    the contrastive loss. Their trunk states are cached beside the training shards' (``mpe cache``)."""

    enabled: bool = False
    per_caption: int = Field(2, ge=1, description="negatives per caption (fewer where fewer kinds of change apply)")
    seed: int = Field(0, description="which negatives are drawn; a property of the data, not of the training seed")


class TrainConfig(StrictConfig):
    """Ray Train (TorchTrainer) settings and the optimisation schedule."""

    run_name: str = "mpe-default"
    storage_path: str = "ray_results"
    out_dir: str = "models/trained"
    init_from: Literal["scratch", "champion"] = Field(
        "scratch",
        description="scratch: a run is reproducible from its DVC inputs alone; champion: continue "
        "from the registry's @champion's trainable weights (cheaper at scale)",
    )
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    batch_size: int = Field(64, ge=2, description="per worker")
    shuffle_buffer: int = Field(256, ge=1, description="samples each loader worker draws from at random")
    loader_workers: int = Field(1, ge=0, description="decode processes per Ray worker (0: decode in the worker)")
    log_sample_keys: bool = Field(False, description="write every step's sample keys beside the checkpoints")
    autocast: Literal["auto", "bfloat16", "none"] = Field(
        "auto", description="auto: bf16 autocast on GPU, and on a CPU where a start-up probe finds bf16 faster"
    )
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
    hard_negatives: HardNegativesConfig = HardNegativesConfig()

    @field_validator("storage_path")
    @classmethod
    def _a_shared_folder(cls, v: str) -> str:
        # Ray writes the checkpoints, but mpe resumes from the run folder (mpe.training.worker._restore).
        if "://" in v:
            raise ValueError(
                f"{v!r} is a URL: use a folder that every Ray node mounts at the same path (NFS, a cluster file system)"
            )
        return v


class _Benchmark(StrictConfig):
    """One standard benchmark read from local files; ``name`` prefixes its metric keys (``<name>.<metric>``)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="used in metric keys: letters, digits, _ and -")
    path: str


class KarpathyBenchmark(_Benchmark):
    """Flickr30k / MSCOCO in Karpathy's JSON (``dataset_flickr30k.json``, ``dataset_coco.json``)."""

    kind: Literal["karpathy"]
    image_root: str | None = Field(
        None, description="image folder (COCO: holding filepath/); default the JSON's folder"
    )
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
    top_k: list[int] = Field(
        [1, 5], min_length=1, description="accuracies reported (k above the class count: left out)"
    )

    @model_validator(mode="after")
    def _check(self) -> ImageFolderBenchmark:
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


class SugarCrepeBenchmark(_Benchmark):
    """SugarCrepe as it ships: ``path`` a folder of per-category JSON files (``swap_att.json`` …), each
    ``{id: {filename, caption, negative_caption}}``; accuracy of the caption over the negative per category."""

    kind: Literal["sugarcrepe"]
    image_root: str = Field(description="the image folder the JSON's filename entries are relative to (COCO val2017)")


class AroBenchmark(_Benchmark):
    """ARO's VG-Relation or VG-Attribution JSON (``visual_genome_relation.json``, ``visual_genome_attribution.json``):
    a list of ``{image_path, bbox_x, bbox_y, bbox_w, bbox_h, true_caption, false_caption}`` with ``relation_name``
    (relation) or ``attributes`` (attribution); the image is cropped to the box. Accuracy and macro accuracy (the
    mean over relations, or attribute pairs, of their accuracy), as ARO reports them."""

    kind: Literal["aro_vg_relation", "aro_vg_attribution"]
    image_root: str | None = Field(
        None, description="the folder image_path is relative to; default <json folder>/images"
    )
    min_group_count: int = Field(
        0, ge=0, description="groups with fewer items are left out of the macro accuracy (ARO's attribution uses 25)"
    )
    exclude_groups: list[str] = Field(
        [], description="groups left out of the macro accuracy (ARO leaves out the relations it deems symmetric)"
    )


class WinogroundBenchmark(_Benchmark):
    """Winoground's ``examples.jsonl`` (``id``, ``image_0``, ``image_1``, ``caption_0``, ``caption_1`` …) with the
    images as ``<image_root>/<image_i>.png``: text, image and group score."""

    kind: Literal["winoground"]
    image_root: str | None = Field(None, description="the image folder; default <jsonl folder>/images")


Benchmark = Annotated[
    KarpathyBenchmark
    | ClipBenchmarkWds
    | ImageFolderBenchmark
    | NegBenchMcq
    | SugarCrepeBenchmark
    | AroBenchmark
    | WinogroundBenchmark,
    Field(discriminator="kind"),
]


class EvalConfig(StrictConfig):
    """The evaluate stage: what is measured and where its plots go (its numbers go to ``metrics_dir``)."""

    plots_dir: str = "plots"
    batch_size: int = Field(64, ge=1)
    ks: list[Annotated[int, Field(ge=1)]] = Field([1, 5, 10], min_length=1, description="the k of R@k (each >= 1)")
    compare_untrained: bool = True
    splits: list[Literal["test", "val"]] = Field(["test"], description="splits evaluated (val: for choices)")
    benchmarks: list[Benchmark] = Field([], description="standard benchmarks from local files (README)")

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if len(set(self.ks)) != len(self.ks):
            raise ValueError(f"ks: {self.ks} names a k twice")
        names = [b.name for b in self.benchmarks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"benchmark names must be unique (they prefix metric keys): {dup}")
        return self


class RegisterConfig(StrictConfig):
    """MLflow model registry and the promotion gate."""

    model_name: str = "mpe-multiprompt"
    gate_metric: str = Field(
        "mean_recall",
        description="mean_recall (the test split's R@k), or a key of "
        "metrics/eval.json's 'trained' (a benchmark's: <name>.<metric>)",
    )
    margin: float = Field(0.005, ge=0)
    gate_wait_s: float = Field(
        900,
        gt=0,
        description="how long the gate waits for an earlier registration's "
        "decision before taking that registration as abandoned",
    )


class DvcConfig(StrictConfig):
    remote: str = "localremote"
    push: bool = True


class ScheduleConfig(StrictConfig):
    cron: str = "0 2 * * *"
    deployment: str = "nightly"


class ServeConfig(StrictConfig):
    """``mpe serve``: where it listens and what one request may hold (the CLI options override these)."""

    host: str = Field("127.0.0.1", description="interface to bind; 0.0.0.0 exposes the model to the network")
    port: int = Field(8000, ge=1, le=65535)
    max_body_mb: float = Field(16.0, gt=0, description="request body limit (413 above it)")
    max_rows: int = Field(256, ge=1, description="rows per request")
    max_caption_chars: int = Field(2000, ge=1, description="longer captions are refused (400), not truncated")


class Params(StrictConfig):
    """The whole ``params.yaml``."""

    seed: int = 0
    metrics_dir: str = Field(
        "metrics", description="the folder every stage writes its metrics file to (file names: mpe.records)"
    )
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

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        """``evaluate.out_dir`` (mpe 0.1) is ``metrics_dir`` now: every stage writes there, not only evaluate."""
        if not (isinstance(data, dict) and isinstance(data.get("evaluate"), dict) and "out_dir" in data["evaluate"]):
            return data
        evaluate = dict(data["evaluate"])
        old = evaluate.pop("out_dir")
        if "metrics_dir" in data and data["metrics_dir"] != old:
            raise ValueError(
                f"evaluate.out_dir ({old!r}) is the old name of metrics_dir ({data['metrics_dir']!r}): "
                "keep metrics_dir only"
            )
        warnings.warn(
            "params: evaluate.out_dir is now the top-level key metrics_dir (read as such); rename it, "
            "since dvc.yaml tracks metrics_dir",
            DeprecationWarning,
            stacklevel=2,
        )
        return {**data, "evaluate": evaluate, "metrics_dir": old}

    @model_validator(mode="after")
    def _check(self) -> Params:
        if self.cache.enabled and self.model.text.train_apt_embeddings:
            raise ValueError(
                "model.text.train_apt_embeddings must be false when cache.enabled: the cached "
                "trunk already holds the APT embeddings' effect"
            )
        if self.cache.enabled and self.model.text.tuning == "lora":
            raise ValueError("model.text.tuning 'lora' trains every layer: set cache.enabled: false")
        return self


def read_params_file(path: str | Path) -> dict:
    """A params file's raw mapping, or a :class:`ConfigError` naming the file (missing, empty, not text,
    not YAML, not a mapping)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a params file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {err.start}): a params file is YAML") from None
    if not text.strip():
        raise ConfigError(f"{path}: empty; write the params there (the project's params.yaml is the template)")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """``data`` with each ``key.path=value`` set (the value read as YAML: ``0.002``, ``true``, ``[1, 5]``,
    ``null``), as ``dvc exp run -S`` and Hydra take them; the result is validated like the file."""
    out = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set {item!r}: expected key.path=value (e.g. train.lr=0.002)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {err}") from None
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(d):
    return {k: _deep_copy(v) for k, v in d.items()} if isinstance(d, dict) else d


def load_params(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read and validate a params file, with ``key.path=value`` overrides applied first."""
    data = apply_overrides(read_params_file(path), overrides)
    source = f"{path}" + (f" (with --set {' '.join(overrides)})" if overrides else "")
    return validate(Params, data, source)


def write_overrides(path: str | Path, overrides: list[str] | tuple[str, ...]) -> list[str]:
    """Write ``key.path=value`` overrides into the params file itself, keeping its comments and order (as ``dvc
    exp run -S`` does to the workspace's params); validated first, written atomically. The changes, one line
    each."""
    import io

    from ruamel.yaml import YAML

    from mpe.files.atomic import write_text

    path = Path(path)
    validate(Params, apply_overrides(read_params_file(path), overrides), f"{path} (with --set {' '.join(overrides)})")
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(path.read_text(encoding="utf-8"))
    said = []
    for item in overrides:
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = doc
        for part in parts[:-1]:
            if part not in node:
                node[part] = {}
            node = node[part]
        old = node.get(parts[-1], "(unset)")
        node[parts[-1]] = value
        said.append(f"{path}: {key.strip()}: {old} -> {value}")
    buf = io.StringIO()
    rt.dump(doc, buf)
    write_text(path, buf.getvalue())
    return said
