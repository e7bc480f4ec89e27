"""The corpus's per-sample figures, measured where the data is and stated where it is not: training samples and
shards, the unique captions each shard stores and their token counts (the cache's rows), the evaluation
texts, and the bytes of an image as the data stage writes it.

Where they come from, best first: the shards the data stage wrote (exact: the very captions the cache
stage reads, the tar files' sizes); the shapes world's plan (its captions, generated without rendering);
a URL list's parts on disk (every caption tokenized, rows counted). Any figure can be stated instead
(``--samples`` scales the measured ones to a corpus that is not here, e.g. LAION-400M from one part), and
the plan says which figures were measured and which stated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from mpe.config import DataConfig
from mpe.errors import ConfigError
from mpe.model.text.prompt_sequence import tokenize_captions


@dataclass(frozen=True)
class TextFigures:
    """Captions as the cache stores them: ``texts`` unique captions (per shard) whose token counts sum to
    ``tokens`` and whose squares sum to ``tokens_sq``, for ``samples`` samples in ``shards`` shards."""

    texts: int = 0
    tokens: float = 0.0
    tokens_sq: float = 0.0
    samples: int = 0
    shards: int = 0

    @property
    def mean_tokens(self) -> float:
        return self.tokens / self.texts if self.texts else 0.0

    def __add__(self, other: TextFigures) -> TextFigures:
        return TextFigures(
            self.texts + other.texts,
            self.tokens + other.tokens,
            self.tokens_sq + other.tokens_sq,
            self.samples + other.samples,
            self.shards + other.shards,
        )

    def scaled(self, factor: float, shards: int) -> TextFigures:
        return TextFigures(
            round(self.texts * factor),
            self.tokens * factor,
            self.tokens_sq * factor,
            round(self.samples * factor),
            shards,
        )


@dataclass(frozen=True)
class Corpus:
    """What the planner knows of the data, and how each figure was obtained (``how``: figure → words)."""

    train: TextFigures  # the training shards' unique captions (one cache shard per data shard)
    eval_texts: TextFigures  # the evaluation texts (one more cache shard)
    eval_images: int  # images the evaluation embeds (test split and negation pairs)
    download_rows: int  # rows handed to img2dataset, every split
    image_bytes: float | None  # bytes per downloaded sample in the shards (image, caption, metadata)
    how: dict[str, str] = field(default_factory=dict)


def text_figures(tokenizer, captions_per_shard: list[list[str]], max_tokens: int, samples: int) -> TextFigures:
    """Token figures of each shard's unique captions, tokenized exactly as the cache stage tokenizes them."""
    out = TextFigures(samples=samples, shards=len(captions_per_shard))
    for caps in captions_per_shard:
        unique = list(dict.fromkeys(caps))
        lens = [len(i) for i in tokenize_captions(tokenizer, unique, max_tokens)]
        out = out + TextFigures(len(lens), float(sum(lens)), float(sum(n * n for n in lens)))
    return out


def from_shards(data_root: str, tokenizer, max_tokens: int) -> Corpus:
    """Exact figures from the shards the data stage wrote under ``data_root``."""
    from mpe.data.evaluation_sets import evaluation_texts, negation_queries
    from mpe.data.stats import read_stats
    from mpe.data.tar_stream import captions as shard_captions
    from mpe.files import storage

    shards = storage.list_files(storage.join(data_root, "shards", "train"), ".tar")
    per_shard = [[c for _, c in shard_captions(url)] for url in shards]
    samples = sum(len(c) for c in per_shard)
    train = text_figures(tokenizer, per_shard, max_tokens, samples)
    evals = text_figures(tokenizer, [list(dict.fromkeys(evaluation_texts(data_root)))], max_tokens, 0)
    stats = read_stats(data_root)
    test = stats["splits"].get("test", {}).get("successes", 0)
    images = test + 2 * len(negation_queries(data_root))
    tar_bytes = sum(storage.size(u) for u in shards)
    return Corpus(
        train,
        evals,
        images,
        int(stats["outcomes"]["count"]),
        tar_bytes / samples if samples else None,
        {
            "captions": f"measured: the {len(shards)} training shards' captions in {data_root}",
            "image_bytes": "measured: training shards' bytes per sample",
        },
    )


def from_shapes_plan(cfg: DataConfig, seed: int, tokenizer, max_tokens: int) -> Corpus:
    """The shapes world's captions as the data stage will write them (training rows in URL-list order, so
    shards of ``samples_per_shard`` consecutive rows), generated without rendering an image."""
    from mpe.data.shapes import plan_splits, zero_shot_prompts

    s = cfg.shapes
    plan = plan_splits(
        s.train_captions, s.val_captions, s.test_captions, s.negation_queries, s.held_out_pairs, s.p_secondary, seed
    )
    rows = [scene.caption() for scene in plan.train for _ in range(s.images_per_caption)]
    per_shard = [rows[i : i + cfg.samples_per_shard] for i in range(0, len(rows), cfg.samples_per_shard)]
    evals = [sc.caption() for sc in plan.test + plan.val] + [q for q, _, _ in plan.negation]
    evals += [p for classes in zero_shot_prompts().values() for ps in classes.values() for p in ps]
    return Corpus(
        text_figures(tokenizer, per_shard, max_tokens, len(rows)),
        text_figures(tokenizer, [list(dict.fromkeys(evals))], max_tokens, 0),
        len(plan.test) + 2 * len(plan.negation),
        len(rows) + len(plan.val) + len(plan.test) + 2 * len(plan.negation),
        None,
        {"captions": "measured: the shapes world's planned captions (not rendered; aspect probes left out)"},
    )


def from_url_list(cfg: DataConfig, tokenizer, max_tokens: int) -> Corpus:
    """A URL list's parts on disk: rows kept after the metadata filters, split as the data stage splits them,
    every training caption tokenized (shards of ``samples_per_shard`` rows per part)."""
    from mpe.data.metadata_filter import filter_rows
    from mpe.data.url_list import evaluation_rows, list_parts, read_url_list

    per_shard, test_texts, rows = [], [], 0
    for path in list_parts(cfg.url_list):
        df, _ = read_url_list(path, cfg.url_col, cfg.caption_col, cfg.encoding)
        df, _ = filter_rows(df, cfg.filters, path)
        rows += len(df)
        test = evaluation_rows(df["URL"], cfg.test_fraction)
        caps = df.loc[~test, "TEXT"].tolist()
        per_shard += [caps[i : i + cfg.samples_per_shard] for i in range(0, len(caps), cfg.samples_per_shard)]
        test_texts += df.loc[test, "TEXT"].tolist()
    train = text_figures(tokenizer, per_shard, max_tokens, sum(len(c) for c in per_shard))
    return Corpus(
        train,
        text_figures(tokenizer, [list(dict.fromkeys(test_texts))], max_tokens, 0),
        len(test_texts),
        rows,
        None,
        {"captions": f"measured: {rows:,} rows of {cfg.url_list} (every download assumed a success)"},
    )


def measure_corpus(cfg: DataConfig, seed: int, tokenizer, max_tokens: int) -> Corpus:
    """The best figures available for ``cfg``: its shards on disk, else its shapes plan or URL list."""
    from mpe.files import storage

    if storage.exists(storage.join(cfg.out_dir, "stats.json")):
        return from_shards(cfg.out_dir, tokenizer, max_tokens)
    if cfg.source == "shapes":
        return from_shapes_plan(cfg, seed, tokenizer, max_tokens)
    return from_url_list(cfg, tokenizer, max_tokens)


def stated(
    corpus: Corpus | None,
    samples_per_shard: int,
    samples: int | None = None,
    caption_tokens: float | None = None,
    image_bytes: float | None = None,
    test_fraction: float = 0.0,
) -> Corpus:
    """``corpus`` with stated figures in place of measured ones: ``samples`` training samples (the measured
    per-sample figures scaled to them: unique captions per sample, tokens per caption), ``caption_tokens``
    (the mean; every caption taken at it when nothing was measured), ``image_bytes`` per sample."""
    how = dict(corpus.how) if corpus else {}
    if corpus is None:
        if samples is None or caption_tokens is None:
            raise ConfigError("mpe plan: no corpus to measure here; state --samples and --caption-tokens")
        t = caption_tokens
        shards = math.ceil(samples / samples_per_shard)
        train = TextFigures(samples, samples * t, samples * t * t, samples, shards)
        n_eval = round(samples * test_fraction)
        corpus = Corpus(
            train,
            TextFigures(n_eval, n_eval * t, n_eval * t * t, 0, 1),
            n_eval,
            samples + n_eval,
            None,
        )
        how["captions"] = f"stated: every caption unique, {caption_tokens:g} tokens each"
    else:
        if samples is not None:
            f = samples / corpus.train.samples
            shards = math.ceil(samples / samples_per_shard)
            corpus = replace(
                corpus,
                train=corpus.train.scaled(f, shards),
                eval_texts=corpus.eval_texts.scaled(f, 1),
                eval_images=round(corpus.eval_images * f),
                download_rows=round(corpus.download_rows * f),
            )
            how["samples"] = f"stated: {samples:,} training samples (measured figures scaled ×{f:,.4g})"
        if caption_tokens is not None:
            t = caption_tokens
            tr, ev = corpus.train, corpus.eval_texts
            corpus = replace(
                corpus,
                train=replace(tr, tokens=tr.texts * t, tokens_sq=tr.texts * t * t),
                eval_texts=replace(ev, tokens=ev.texts * t, tokens_sq=ev.texts * t * t),
            )
            how["captions"] = how.get("captions", "") + f"; stated: {caption_tokens:g} tokens per caption"
    if image_bytes is not None:
        corpus = replace(corpus, image_bytes=image_bytes)
        how["image_bytes"] = f"stated: {image_bytes:,.0f} bytes per sample"
    return replace(corpus, how=how)
