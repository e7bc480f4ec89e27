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
    VideoConfig,
    VisionConfig,
    validate,
)


class BaseModelConfig(StrictConfig):
    """Which pretrained LLM to start from."""

    name: str = Field(
        "smollm2-135m",
        description="the bundled smollm2-135m (no network), a local Hugging Face folder, or a hub id (google/gemma-2b)",
    )
    revision: str | None = Field(None, description="a hub revision (commit or tag) to pin; null: the default branch")
    trust_remote_code: bool = Field(False, description="let a hub model run its own code; off unless you trust it")
    save_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="precision of the saved base model (models/base)"
    )
    out_dir: str = Field("models/base", description="where the base model with the APT tokens is saved")


class ShapesConfig(StrictConfig):
    """Sizes of the synthetic shapes world."""

    train_captions: int = Field(500, ge=1, description="unique training captions")
    images_per_caption: int = Field(4, ge=1, description="renderings of each training caption")
    val_captions: int = Field(
        0, ge=0, description="validation captions (for choices: budgets, reweighting); 0: no validation split"
    )
    test_captions: int = Field(
        150, ge=2, description="test captions, half with colour-shape pairs held out of training (compositional test)"
    )
    negation_queries: int = Field(
        80, ge=0, description="queries of the negation benchmark ('a red circle and no blue square')"
    )
    held_out_pairs: int = Field(6, ge=0, le=48, description="colour-shape pairs never shown in training")
    p_secondary: float = Field(0.6, ge=0, le=1, description="probability that an image holds a second shape")
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


class VideoShapesConfig(StrictConfig):
    """Sizes of the synthetic moving-shapes video world (``mpe.data.video_shapes``); clips are
    ``data.image_size`` pixels a side."""

    train_captions: int = Field(
        240, ge=1, description="unique training captions, each rendered clips_per_caption times"
    )
    clips_per_caption: int = Field(
        2, ge=1, description="clips rendered of each training caption, each its own random draw"
    )
    test_pairs: int = Field(16, ge=1, description="test clips come in pairs: a clip and its frames in reverse order")
    frames: int = Field(15, ge=2, description="frames rendered per clip")
    fps: int = Field(8, ge=1, description="frames per second of the written mp4 files")


class VideoDataConfig(StrictConfig):
    """Video sources (``data.source`` video_shapes, video_folder, video_webdataset) and the zero-shot video set."""

    zero_shot_test: bool = Field(
        True, description="image sources: also write the moving-shapes test pairs (shards/video_test)"
    )
    folder: str | None = Field(None, description="video_folder: the folder holding the videos")
    captions: str | None = Field(
        None, description="video_folder: a CSV with columns video (a file under folder), caption"
    )
    webdataset: str | None = Field(None, description="video_webdataset: a folder of video2dataset webdataset shards")
    shapes: VideoShapesConfig = VideoShapesConfig()


VIDEO_SOURCES = ("video_shapes", "video_folder", "video_webdataset")
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

    source: Literal["shapes", "url_list", "video_shapes", "video_folder", "video_webdataset"] = Field(
        "shapes",
        description="shapes: the synthetic world, rendered locally (no network); url_list: data.url_list "
        "through img2dataset; video_shapes: the moving-shapes video world; video_folder / video_webdataset: "
        "videos from data.video",
    )
    url_list: str | None = Field(
        None,
        description="parquet or csv with a URL and a caption column, or a folder "
        "or glob of parts (each part is downloaded once, on its own)",
    )
    url_col: str = Field("URL", description="the URL list's image URL column")
    caption_col: str = Field("TEXT", description="the URL list's caption column")
    encoding: str = Field("utf-8", description="text encoding of a CSV/TSV URL list")
    test_fraction: float = Field(
        0.02,
        gt=0,
        lt=1,
        description="url_list only: rows kept for evaluation, chosen by a hash of the URL (stable as parts are added)",
    )
    test_parts: list[str] | None = Field(
        None,
        min_length=1,
        description="url_list only: the parts (file names or stems) whose hash-chosen rows make the test split; "
        "every row of the other parts trains. null: every part adds test rows, so the test split grows as parts "
        "are added",
    )
    filters: MetadataFilterConfig = MetadataFilterConfig()
    out_dir: str = Field("data", description="where the shards and evaluation sets go (a folder or an fsspec URL)")
    image_size: int = Field(64, ge=8, description="images are resized to this many pixels a side when downloaded")
    samples_per_shard: int = Field(500, ge=1, description="samples per webdataset shard (one cache shard each)")
    processes: int = Field(1, ge=1, description="img2dataset download processes")
    threads: int = Field(16, ge=1, description="img2dataset download threads per process")
    distributor: Literal["multiprocessing", "ray", "pyspark"] = Field(
        "multiprocessing",
        description="img2dataset's distributor: multiprocessing on one machine, ray or pyspark on a cluster",
    )
    timeout: int = Field(10, ge=1, description="seconds per image request (img2dataset)")
    retries: int = Field(0, ge=0, description="retries per failed image request (img2dataset)")
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
    video: VideoDataConfig = VideoDataConfig()

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.source == "url_list" and not self.url_list:
            raise ValueError("source 'url_list' needs url_list: a parquet or csv path")
        if self.test_parts is not None and self.source != "url_list":
            raise ValueError("test_parts: only a url_list source has parts (the shapes world has its own test split)")
        if self.source == "video_folder" and not (self.video.folder and self.video.captions):
            raise ValueError("source 'video_folder' needs video.folder (the videos) and video.captions (a CSV)")
        if self.source == "video_webdataset" and not self.video.webdataset:
            raise ValueError("source 'video_webdataset' needs video.webdataset: a folder of video2dataset shards")
        return self

    @property
    def is_video(self) -> bool:
        return self.source in VIDEO_SOURCES


class CacheConfig(StrictConfig):
    """The trunk hidden-state cache."""

    enabled: bool = Field(
        True, description="cache the frozen trunk's hidden states (off: the whole LLM runs in every step)"
    )
    root: str = Field("cache", description="a folder or any fsspec URL (s3://…) every node reads")
    dtype: Literal["float16", "bfloat16", "float32", "float8_e4m3_row", "float8_e4m3_tensor"] = Field(
        "float16", description="storage; float8 is e4m3 scaled per row or per tensor"
    )
    batch_size: int = Field(32, ge=1, description="captions per forward pass while caching")
    autocast: Literal["auto", "bfloat16", "none"] = Field(
        "auto", description="auto: bf16 autocast on GPU, and on a CPU where a start-up probe finds bf16 faster"
    )
    engine: Literal["local", "ray"] = Field(
        "local", description="local: in this process; ray: Ray Data map_batches on (GPU) actors"
    )
    ray_actors: int = Field(1, ge=1, description="actors of the ray engine")
    gpus_per_actor: float = Field(0, ge=0, description="GPUs per actor of the ray engine (0: CPU)")
    warn_gb: float = Field(500.0, gt=0, description="warn before caching more than this many GB")


class MlflowConfig(StrictConfig):
    tracking_uri: str = Field(
        "sqlite:///mlruns.db",
        description="where MLflow tracks (overridden by --tracking-uri, then MLFLOW_TRACKING_URI)",
    )
    artifact_root: str = Field(
        "mlartifacts", description="artifact folder of a new experiment in a local store (a server keeps its own)"
    )
    experiment: str = Field("mpe", description="the MLflow experiment of the training runs")
    tags: dict[str, str] = Field({}, description="extra tags on the training run (experiment suites set them)")


class RayConfig(StrictConfig):
    address: str | None = Field(None, description="None: start a local cluster; 'auto' or ray://host:10001")
    num_cpus: int | None = Field(
        2, ge=1, description="CPUs of the local Ray cluster (ray.address null; one per training worker)"
    )


class HardNegativesConfig(StrictConfig):
    """Hard-negative captions in training, as NegCLIP (``mpe.data.hard_negatives``): each caption of a batch
    brings ``per_caption`` captions with one aspect replaced or two attributes swapped, as more negatives of
    the contrastive loss. Their trunk states are cached beside the training shards' (``mpe cache``)."""

    enabled: bool = Field(False, description="add each caption's hard negatives to the contrastive loss")
    per_caption: int = Field(2, ge=1, description="negatives per caption (fewer where fewer kinds of change apply)")
    seed: int = Field(0, description="which negatives are drawn; a property of the data, not of the training seed")


class TrainConfig(StrictConfig):
    """Ray Train (TorchTrainer) settings and the optimisation schedule."""

    run_name: str = Field(
        "mpe-default", description="the Ray run is <run_name>-<fingerprint of its inputs>: the same inputs resume it"
    )
    storage_path: str = Field(
        "ray_results", description="Ray's checkpoints; on a cluster a folder every node mounts at this same path"
    )
    out_dir: str = Field("models/trained", description="where the trained model folder is saved")
    init_from: Literal["scratch", "champion"] = Field(
        "scratch",
        description="scratch: a run is reproducible from its DVC inputs alone; champion: continue "
        "from the registry's @champion's trainable weights (cheaper at scale)",
    )
    num_workers: int = Field(2, ge=1, description="Ray Train workers (gloo on CPU, NCCL with use_gpu)")
    use_gpu: bool = Field(False, description="one GPU per Ray Train worker")
    batch_size: int = Field(64, ge=2, description="per worker")
    shuffle_buffer: int = Field(256, ge=1, description="samples each loader worker draws from at random")
    loader_workers: int = Field(1, ge=0, description="decode processes per Ray worker (0: decode in the worker)")
    log_sample_keys: bool = Field(False, description="write every step's sample keys beside the checkpoints")
    autocast: Literal["auto", "bfloat16", "none"] = Field(
        "auto", description="auto: bf16 autocast on GPU, and on a CPU where a start-up probe finds bf16 faster"
    )
    epochs: float = Field(4.0, gt=0, description="passes over the training shards (the step count follows from it)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps whatever epochs says")
    lr: float = Field(5e-4, gt=0, description="peak learning rate (AdamW; linear warmup, cosine decay)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(20, ge=0, description="linear warmup steps")
    grad_clip: float = Field(1.0, gt=0, description="gradient norm clip")
    checkpoint_every: int = Field(50, ge=1, description="steps between Ray checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept (the newest)")
    max_failures: int = Field(
        2, ge=0, description="worker-group restarts from the last checkpoint before the run fails"
    )
    fail_at_step: int | None = Field(None, description="testing: one worker raises once at this step")
    log_every: int = Field(5, ge=1, description="steps between MLflow metric logs")
    save_dtype: Literal["float32", "bfloat16"] = Field("bfloat16", description="precision of the saved LLM weights")
    threads_per_worker: int | None = Field(
        None, description="torch threads per Ray worker; null: the CPUs divided among the workers"
    )
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
    path: str = Field(description="the benchmark's file or folder")


class KarpathyBenchmark(_Benchmark):
    """Flickr30k / MSCOCO in Karpathy's JSON (``dataset_flickr30k.json``, ``dataset_coco.json``)."""

    kind: Literal["karpathy"]
    image_root: str | None = Field(
        None, description="image folder (COCO: holding filepath/); default the JSON's folder"
    )
    split: str = Field("test", description="the split of the JSON that is scored")


class ClipBenchmarkWds(_Benchmark):
    """CLIP_benchmark's webdataset retrieval layout: ``path/<split>/nshards.txt`` and ``0.tar`` …"""

    kind: Literal["clip_benchmark_wds"]
    split: str = Field("test", description="the split folder under path")


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


class MsrvttBenchmark(_Benchmark):
    """MSR-VTT text↔video retrieval: a test CSV (the 1k-A split's ``MSRVTT_JSFUSION_test.csv``: ``key``,
    ``vid_key``, ``video_id``, ``sentence``) and the folder of videos (``<video_id>.mp4``)."""

    kind: Literal["msrvtt"]
    video_root: str = Field(description="the folder holding <video_id>.mp4 (MSR-VTT's videos/all)")


Benchmark = Annotated[
    KarpathyBenchmark
    | ClipBenchmarkWds
    | ImageFolderBenchmark
    | NegBenchMcq
    | SugarCrepeBenchmark
    | AroBenchmark
    | WinogroundBenchmark
    | MsrvttBenchmark,
    Field(discriminator="kind"),
]


class EvalConfig(StrictConfig):
    """The evaluate stage: what is measured and where its plots go (its numbers go to ``metrics_dir``)."""

    plots_dir: str = Field("plots", description="where the evaluation plots go")
    batch_size: int = Field(64, ge=1, description="images or captions per forward pass")
    ks: list[Annotated[int, Field(ge=1)]] = Field([1, 5, 10], min_length=1, description="the k of R@k (each >= 1)")
    compare_untrained: bool = Field(True, description="also evaluate the untrained twin (same architecture and trunk)")
    splits: list[Literal["test", "val"]] = Field(["test"], description="splits evaluated (val: for choices)")
    probe_train_images: int = Field(
        500,
        ge=0,
        description="training images the linear probes are fitted on: a fixed sample drawn with the seed, the same "
        "for every model (all of them when fewer; 0: no probes)",
    )
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

    model_name: str = Field(
        "mpe-multiprompt", description="the registered model's name (train.init_from: champion reads its @champion)"
    )
    gate_metric: str = Field(
        "mean_recall",
        description="mean_recall (the test split's R@k), or a key of "
        "metrics/eval.json's 'trained' (a benchmark's: <name>.<metric>)",
    )
    margin: float = Field(
        0.005, ge=0, description="@champion only if the gate metric beats the champion's by this much"
    )
    gate_wait_s: float = Field(
        900,
        gt=0,
        description="how long the gate waits for an earlier registration's "
        "decision before taking that registration as abandoned",
    )


class DvcConfig(StrictConfig):
    remote: str = Field("localremote", description="the DVC remote the flow pushes to (.dvc/config)")
    push: bool = Field(
        True, description="push the outputs after the stages (the registry's lineage names pushed hashes)"
    )


class ScheduleConfig(StrictConfig):
    cron: str = Field("0 2 * * *", description="when mpe schedule runs the retrain flow (cron, the server's time zone)")
    deployment: str = Field("nightly", description="the Prefect deployment's name")


class ServeConfig(StrictConfig):
    """``mpe serve``: where it listens and what one request may hold (the CLI options override these)."""

    host: str = Field("127.0.0.1", description="interface to bind; 0.0.0.0 exposes the model to the network")
    port: int = Field(8000, ge=1, le=65535, description="port")
    max_body_mb: float = Field(16.0, gt=0, description="request body limit (413 above it)")
    max_rows: int = Field(256, ge=1, description="rows per request")
    max_caption_chars: int = Field(2000, ge=1, description="longer captions are refused (400), not truncated")
    max_request_megapixels: float = Field(
        128.0,
        gt=0,
        description="decoded pixels of all a request's images together, in millions, read from their headers "
        "before any is decoded (400 above); each image is also at most 4096x4096",
    )


class SearchConfig(StrictConfig):
    """The search index over the trained model's image embeddings (``mpe index``, and the retrain flow after
    registration) and the ``/search`` that ``mpe serve`` answers with it."""

    splits: list[Literal["train", "val", "test"]] = Field(
        ["train", "test"], min_length=1, description="the data stage's splits whose images are indexed"
    )
    out_dir: str = Field(
        "models/index", description="the index folder (index.faiss, items.parquet, embeddings.npy, index.json)"
    )
    index_key: str = Field(
        "auto",
        description="auto: exact (Flat) up to exact_max images, IVF-PQ above it, sized by the count "
        "(autofaiss-style); or any faiss index_factory string",
    )
    exact_max: int = Field(100_000, ge=1, description="largest collection indexed exactly when index_key is auto")
    nprobe: int = Field(16, ge=1, description="IVF lists visited per query (IVF indexes only)")
    batch_size: int = Field(64, ge=1, description="images embedded per forward pass while building")
    max_k: int = Field(100, ge=1, description="the largest k /search answers (400 above it)")


class Params(StrictConfig):
    """The whole ``params.yaml``."""

    seed: int = Field(
        0, description="seed of the shapes world, the untrained twin and every training worker's initial weights"
    )
    metrics_dir: str = Field(
        "metrics",
        min_length=1,
        description="the folder every stage writes its metrics file to (file names: mpe.records)",
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
    search: SearchConfig = SearchConfig()

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
        local = self.ray.address is None and self.ray.num_cpus is not None and not self.train.use_gpu
        if local and self.train.num_workers > self.ray.num_cpus:  # Ray Train would wait for CPUs forever
            raise ValueError(
                f"train.num_workers ({self.train.num_workers}) needs a CPU each, but the local Ray cluster gets "
                f"ray.num_cpus ({self.ray.num_cpus}); lower train.num_workers or raise ray.num_cpus"
            )
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
