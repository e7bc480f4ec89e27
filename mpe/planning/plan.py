"""The plan: for a params file, a corpus and a cluster, what each stage moves and computes and how long it
takes there — the download's volume and shards, the cache's bytes (per storage dtype) and trunk FLOPs,
FLOPs per training step and the steps, and each stage's time and accelerator-hours at the stated
utilisation.

A compute stage takes ``overhead + max(FLOPs / (accelerators × peak × utilisation), bytes / bandwidth)``:
whichever of its compute and its reads and writes is slower bounds it; the download is bounded by the
nodes' network and by their cores resizing images. Accelerator-hours count every accelerator of the
cluster for the whole stage (a cluster is held, not lent per stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from mpe.cache.store import STORAGE, tensor_bytes
from mpe.config import Params
from mpe.errors import ConfigError, DataError
from mpe.planning.cluster import ClusterSpec
from mpe.planning.corpus import Corpus
from mpe.planning.work import ModelWork


@dataclass(frozen=True)
class StagePlan:
    stage: str
    seconds: float
    bound: str  # what limits it: compute, storage, network, cpu, fixed
    flops: float | None = None
    bytes: float | None = None
    accelerator_hours: float = 0.0
    detail: str = ""


@dataclass(frozen=True)
class Plan:
    cluster: ClusterSpec
    cache_dtype: str
    precision: str
    peak_flops: float  # one accelerator, in the precision the stages run in
    corpus: Corpus
    work: ModelWork
    download_rows: int
    download_bytes: float | None
    data_shards: int
    cache_rows: float
    cache_bytes: int  # the cache shards' tensors (train shards and the evaluation texts' shard)
    cache_header_bytes: float  # their JSON headers (sample keys and identity), estimated
    cache_flops: float
    workers: int
    global_batch: int
    steps: int
    train_flops_per_step: float
    stages: list[StagePlan] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    @property
    def accelerator_hours(self) -> float:
        return sum(s.accelerator_hours for s in self.stages)

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.stage == name)

    def to_json(self) -> dict:
        from dataclasses import asdict

        out = {k: v for k, v in asdict(self).items() if k not in ("cluster", "corpus", "work")}
        out["cluster"] = self.cluster.name
        out["corpus"] = {k: v for k, v in asdict(self.corpus).items()}
        out["work"] = asdict(self.work)
        out["seconds"] = self.seconds
        out["accelerator_hours"] = self.accelerator_hours
        return out


def peak_of(cluster: ClusterSpec, measured: dict[str, float] | None) -> tuple[str, float]:
    """The precision the compute stages run in and one accelerator's peak FLOP/s in it."""
    peaks = measured if cluster.accelerator.peak_tflops == "measured" else cluster.accelerator.peak_tflops
    if peaks is None:
        raise ValueError("the cluster's peak is 'measured' but no measurement was given")  # a caller's bug
    scale = 1.0 if cluster.accelerator.peak_tflops == "measured" else 1e12
    precision = max(peaks, key=peaks.get) if cluster.precision == "best" else cluster.precision
    if precision not in peaks:
        raise ConfigError(f"cluster {cluster.name!r}: precision {precision} has no peak_tflops entry")
    return precision, peaks[precision] * scale


def header_bytes(samples: int, shards: int, key_chars: int) -> float:
    """Cache shards' JSON headers, estimated: the sample keys (a JSON list inside a JSON string: each key
    quoted with escaped quotes and a comma) and about 580 bytes of tensor entries and identity per shard."""
    return samples * (key_chars + 5) + 580 * shards


def sample_key_chars(samples_per_shard: int) -> int:
    """img2dataset's sample keys: the shard number in 5 digits, then the row in as many as the shard needs."""
    return 5 + len(str(max(samples_per_shard - 1, 1)))


def _workers(params: Params, cluster: ClusterSpec) -> int:
    """Ray Train's workers: one per GPU on a GPU cluster; ``train.num_workers`` processes on a CPU."""
    return cluster.accelerators if params.train.use_gpu else params.train.num_workers


def make_plan(
    params: Params,
    cluster: ClusterSpec,
    corpus: Corpus,
    work: ModelWork,
    cache_dtype: str | None = None,
    measured_peak: dict[str, float] | None = None,
) -> Plan:
    """The plan of ``params`` on ``cluster`` (``measured_peak``: FLOP/s by precision, for a cluster whose peak
    is 'measured')."""
    dtype = cache_dtype or params.cache.dtype
    precision, peak = peak_of(cluster, measured_peak)
    accels, util, over = cluster.accelerators, cluster.utilisation, cluster.overhead_s
    storage_bw = cluster.storage_gbyte_per_s * 1e9
    hold = lambda s: s * accels / 3600  # noqa: E731
    stages = []

    # data: the download, bounded by the network, the cores resizing images, or the storage it writes to
    rows = corpus.download_rows
    dl_bytes = rows * corpus.image_bytes if corpus.image_bytes else None
    bounds = {"cpu": rows / (cluster.nodes * cluster.cpus_per_node * cluster.download_images_per_s_per_core)}
    if dl_bytes:
        bounds["network"] = dl_bytes / (cluster.nodes * cluster.network_gbit_per_s * 1e9 / 8)
        bounds["storage"] = dl_bytes / storage_bw
    bound = max(bounds, key=bounds.get)
    secs = over.data + bounds[bound]
    shards = corpus.train.shards
    stages.append(
        StagePlan("data", secs, bound, None, dl_bytes, hold(secs), f"{rows:,} rows into {shards:,} training shards")
    )
    stages.append(StagePlan("base_model", over.base_model, "fixed", None, None, hold(over.base_model)))

    # cache: every unique caption (per shard) and evaluation text through the trunk; the shards written
    sd = STORAGE[dtype]
    tr, ev = corpus.train, corpus.eval_texts
    rows_train = tr.tokens + tr.texts * work.prompt_rows
    rows_eval = ev.tokens + ev.texts * work.prompt_rows
    cache_bytes = tensor_bytes(sd, work.hidden, round(rows_train), tr.texts, tr.samples, max(tr.shards, 1))
    if ev.texts:
        cache_bytes += tensor_bytes(sd, work.hidden, round(rows_eval), ev.texts, ev.texts, 1)
    # evaluation texts are keyed by their sha256 in hex
    head = header_bytes(tr.samples, tr.shards, sample_key_chars(params.data.samples_per_shard))
    head += header_bytes(ev.texts, 1 if ev.texts else 0, 64)
    cache_flops = work.trunk_flops_sum(tr.texts, tr.tokens, tr.tokens_sq) + work.trunk_flops_sum(
        ev.texts, ev.tokens, ev.tokens_sq
    )
    bounds = {"compute": cache_flops / (accels * peak * util.cache), "storage": (cache_bytes + head) / storage_bw}
    bound = max(bounds, key=bounds.get)
    secs = over.cache + bounds[bound]
    stages.append(
        StagePlan(
            "cache",
            secs,
            bound,
            cache_flops,
            cache_bytes + head,
            hold(secs),
            f"{tr.texts + ev.texts:,} texts × {(rows_train + rows_eval) / max(tr.texts + ev.texts, 1):.1f} rows "
            f"× {work.hidden} × {sd.itemsize} B ({dtype})",
        )
    )

    # train: steps of the global batch, each reading its samples' cached states and images
    from mpe.training.run_identity import total_steps

    workers = _workers(params, cluster)
    tcfg = params.train.model_copy(update={"num_workers": workers})
    steps = total_steps(tcfg, tr.samples)
    global_batch = params.train.batch_size * workers
    per_step = work.train_flops_per_sample * global_batch
    per_sample_bytes = (cache_bytes / max(tr.samples, 1)) + (corpus.image_bytes or 0.0)
    used = min(workers, accels) if params.train.use_gpu else accels
    bounds = {
        "compute": steps * per_step / (used * peak * util.train),
        "storage": steps * global_batch * per_sample_bytes / storage_bw,
    }
    bound = max(bounds, key=bounds.get)
    secs = over.train + bounds[bound]
    stages.append(
        StagePlan(
            "train",
            secs,
            bound,
            steps * per_step,
            steps * global_batch * per_sample_bytes,
            hold(secs),
            f"{steps:,} steps × {global_batch:,} samples ({workers} workers)",
        )
    )

    # evaluate: the evaluation texts through the top and the images through the vision tower, per model
    models = 2 if params.evaluate.compare_untrained else 1
    ev_flops = models * (ev.texts * work.eval_text_flops + corpus.eval_images * work.eval_image_flops)
    secs = over.evaluate + ev_flops / (peak * util.evaluate)  # one accelerator
    stages.append(
        StagePlan(
            "evaluate",
            secs,
            "compute",
            ev_flops,
            None,
            hold(secs),
            f"{ev.texts:,} texts and {corpus.eval_images:,} images × {models} models",
        )
    )
    return Plan(
        cluster=cluster,
        cache_dtype=dtype,
        precision=precision,
        peak_flops=peak,
        corpus=corpus,
        work=work,
        download_rows=rows,
        download_bytes=dl_bytes,
        data_shards=shards,
        cache_rows=rows_train + rows_eval,
        cache_bytes=cache_bytes,
        cache_header_bytes=head,
        cache_flops=cache_flops,
        workers=workers,
        global_batch=global_batch,
        steps=steps,
        train_flops_per_step=per_step,
        stages=stages,
    )


# -- rendering ---------------------------------------------------------------------------------------
def _si(x: float | None, unit: str) -> str:
    if x is None:
        return "—"
    for p, name in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= p:
            return f"{x / p:,.3g} {name}{unit}"
    return f"{x:,.3g} {unit}"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def render(plan: Plan) -> str:
    """The plan as Markdown: the inputs it rests on, then one row per stage."""
    c, w, cp = plan.cluster, plan.work, plan.corpus
    lines = [
        f"## {c.name}: {c.nodes} node(s) × {c.accelerator.per_node} {c.accelerator.kind}, cache {plan.cache_dtype}",
        "",
        f"- peak: {_si(plan.peak_flops, 'FLOP/s')} per accelerator in {plan.precision}"
        + (f" ({c.accelerator.peak_source})" if c.accelerator.peak_source else "")
        + f"; utilisation stated: cache {c.utilisation.cache:.0%}, train {c.utilisation.train:.0%}, "
        f"evaluate {c.utilisation.evaluate:.0%}",
        f"- model: {w.layers} layers ({w.trunk_layers} cached), hidden {w.hidden}, {w.prompt_rows} prompt rows; "
        f"trunk {_si(w.trunk_flops(cp.train.mean_tokens), 'FLOP')} per caption of "
        f"{cp.train.mean_tokens:.1f} tokens; training {_si(w.train_flops_per_sample, 'FLOP')} per sample "
        f"(forward and backward)",
    ]
    lines += [f"- {k}: {v}" for k, v in cp.how.items()]
    lines += [
        f"- download: {plan.download_rows:,} rows, {_si(plan.download_bytes, 'B')}, {plan.data_shards:,} "
        "training shards",
        f"- cache: {_si(plan.cache_bytes + plan.cache_header_bytes, 'B')} ({_si(plan.cache_bytes, 'B')} of "
        f"states and index, {_si(plan.cache_header_bytes, 'B')} of headers), {_si(plan.cache_flops, 'FLOP')}",
        f"- train: {plan.steps:,} steps × {plan.global_batch:,} samples, {_si(plan.train_flops_per_step, 'FLOP')} "
        "per step",
        "",
        "| stage | work | FLOP | bytes | bound by | time | accelerator-hours |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in plan.stages:
        lines.append(
            f"| {s.stage} | {s.detail} | {_si(s.flops, '')} | {_si(s.bytes, 'B')} | {s.bound} | "
            f"{_duration(s.seconds)} | {s.accelerator_hours:,.3g} |"
        )
    lines.append(f"| **all** | | | | | **{_duration(plan.seconds)}** | **{plan.accelerator_hours:,.4g}** |")
    return "\n".join(lines) + "\n"


def summary_row(plan: Plan) -> str:
    """One line of the comparison table (the docs' headline table)."""
    cost = lambda name: _duration(plan.stage(name).seconds)  # noqa: E731
    return (
        f"| {plan.cluster.name} | {plan.cache_dtype} | {_si(plan.download_bytes, 'B')} | "
        f"{_si(plan.cache_bytes + plan.cache_header_bytes, 'B')} | {_si(plan.cache_flops, 'FLOP')} | "
        f"{_si(plan.train_flops_per_step, 'FLOP')} | {plan.steps:,} | {cost('data')} | {cost('cache')} "
        f"({plan.stage('cache').bound}) | {cost('train')} ({plan.stage('train').bound}) | {_duration(plan.seconds)} | "
        f"{plan.accelerator_hours:,.0f} |"
    )


SUMMARY_HEADER = (
    "| cluster | cache dtype | download | cache on disk | cache FLOP | FLOP / step | steps | data | cache | train | "
    "all | accelerator-hours |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def build_plans(
    params: Params,
    clusters: list[ClusterSpec],
    cache_dtypes: list[str] | None = None,
    samples: int | None = None,
    caption_tokens: float | None = None,
    image_bytes: float | None = None,
    model_config: str | None = None,
    measured_peak: dict[str, float] | None = None,
) -> list[Plan]:
    """Every (cluster, cache dtype) plan of ``params``: the model's work counted once, the corpus measured
    once (with any stated figures in place of measured ones)."""
    from mpe.planning.corpus import measure_corpus, stated
    from mpe.planning.work import count_model_work, model_source

    text = params.model.text
    if not params.cache.enabled or text.pooling == "vanilla_clip":
        # a step that runs the whole LLM (LoRA) or a text tower of its own is not what the planner counts
        raise ConfigError(
            "the planner prices runs that cache the LLM's trunk (cache.enabled: true, an LLM pooling); "
            f"these params have cache.enabled: {params.cache.enabled}, model.text.pooling: {text.pooling}"
        )
    lm_config, tokenizer, how = model_source(params.base_model, text, model_config)
    try:
        corpus = measure_corpus(params.data, params.seed, tokenizer, text.max_caption_tokens)
    except DataError:
        if samples is None or caption_tokens is None:
            raise
        corpus = None  # a URL list that is not here (LAION-400M): the stated figures stand alone
    corpus = stated(
        corpus, params.data.samples_per_shard, samples, caption_tokens, image_bytes, params.data.test_fraction
    )
    corpus = replace(corpus, how={"model config": how, **corpus.how})
    mean_tokens = max(1, round(corpus.train.mean_tokens))
    work = count_model_work(lm_config, tokenizer, params.model, mean_tokens, params.train.batch_size)
    return [
        make_plan(params, cluster, corpus, work, dtype, measured_peak)
        for cluster in clusters
        for dtype in (cache_dtypes or [params.cache.dtype])
    ]
