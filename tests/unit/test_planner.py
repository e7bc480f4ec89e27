"""The planner's parts against independent references: the trunk FLOPs it counts on the meta device equal a
hand count of a Llama layer stack, a float8 cache halves the bytes a storage-bound training step reads, a
cluster file's bad key is named, and `mpe plan` prices LAION-400M with Gemma-2B from its config alone."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from mpe.config import Params
from mpe.errors import ConfigError
from mpe.model.configuration import ModelConfig
from mpe.planning.cluster import ClusterSpec, load_cluster
from mpe.planning.corpus import Corpus, TextFigures
from mpe.planning.plan import make_plan
from mpe.planning.work import ModelWork, count_model_work
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _hand_trunk_flops(cfg, layers: int, t: int) -> int:
    """FLOPs of ``layers`` Llama decoder layers over ``t`` rows: each matmul 2·m·k·n, attention's two."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = h // heads
    per_layer = (
        2 * t * h * heads * hd  # q
        + 2 * 2 * t * h * kv * hd  # k, v
        + 2 * t * heads * hd * h  # o
        + 3 * 2 * t * h * i  # gate, up, down
        + 2 * 2 * t * t * heads * hd  # scores and their weighted sum
    )
    return layers * per_layer


def test_the_counted_trunk_flops_equal_a_hand_count_of_its_layers(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<APT-1>", "<APT-2>"]}, replace_extra_special_tokens=False)
    cfg = tiny_config("llama", len(tok))
    model = ModelConfig(embed_dim=64, text={"num_prompts": 2, "n_top": 1}, vision={"hidden_size": 32, "num_heads": 2})
    work = count_model_work(cfg, tok, model, train_tokens=12, batch=4)
    assert work.trunk_layers == cfg.num_hidden_layers - 1 and work.hidden == cfg.hidden_size
    for n in (5, 20, 47):  # none of them one of the three lengths the polynomial was fitted at
        want = _hand_trunk_flops(cfg, work.trunk_layers, n + work.prompt_rows)
        assert work.trunk_flops(n) == pytest.approx(want, rel=1e-12)
    lens = [3, 8, 30]
    total = work.trunk_flops_sum(len(lens), sum(lens), sum(n * n for n in lens))
    assert total == pytest.approx(sum(_hand_trunk_flops(cfg, work.trunk_layers, n + work.prompt_rows) for n in lens))
    assert work.train_flops_per_sample > 0 and work.eval_image_flops > 0 and work.eval_text_flops > 0


def _cluster(storage_gbyte_per_s: float) -> ClusterSpec:
    return ClusterSpec(
        name="test",
        accelerator={"kind": "gpu", "per_node": 4, "peak_tflops": {"bfloat16": 100}},
        cpus_per_node=8,
        network_gbit_per_s=10,
        storage_gbyte_per_s=storage_gbyte_per_s,
        download_images_per_s_per_core=50,
        utilisation={"cache": 0.5, "train": 0.5, "evaluate": 0.5},
    )


def test_a_float8_cache_halves_what_a_storage_bound_training_step_reads():
    texts = TextFigures(texts=100_000, tokens=2e6, tokens_sq=4.2e7, samples=100_000, shards=10)
    corpus = Corpus(texts, TextFigures(1000, 2e4, 4.2e5, 0, 1), 1000, 101_000, 20_000.0)
    work = ModelWork((1e6, 1e6, 1e3), 100, 2048, 18, 17, 1e9, 20, 1e8, 1e9)
    params = Params(train={"use_gpu": True, "batch_size": 256, "epochs": 1})
    slow = _cluster(storage_gbyte_per_s=0.01)
    f16 = make_plan(params, slow, corpus, work, "float16")
    f8 = make_plan(params, slow, corpus, work, "float8_e4m3_row")
    assert f16.stage("train").bound == f8.stage("train").bound == "storage"
    # per sample: 120 rows × 2048 × 2 B of float16 states + a 56 B index (row offset 8, caption length 4,
    # sha256 32, sample's text 4, rows' CRC-32 8) vs 1 B a state + a 4 B scale per row + the same index; the
    # evaluation texts' shard (1% of the samples' texts) adds a few bytes per sample to both
    row16 = f16.cache_bytes / texts.samples
    row8 = f8.cache_bytes / texts.samples
    assert row8 - row16 / 2 == pytest.approx(120 * 4 + 56 / 2, abs=8)
    assert f16.stage("train").bytes / f8.stage("train").bytes == pytest.approx(
        (row16 + 20_000) / (row8 + 20_000), rel=1e-9
    )
    fast = make_plan(params, _cluster(storage_gbyte_per_s=1e6), corpus, work, "float16")
    assert fast.stage("train").bound == "compute"
    assert fast.stage("train").seconds == pytest.approx(fast.steps * fast.train_flops_per_step / (4 * 100e12 * 0.5))


def test_a_cluster_file_with_a_bad_key_is_refused_naming_it(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text((ROOT / "plans" / "clusters" / "h100x8.yaml").read_text().replace("nodes: 1", "node: 1"))
    with pytest.raises(ConfigError, match=r"c\.yaml.*node"):
        load_cluster(bad)


def test_mpe_plan_prices_laion_400m_with_gemma_2b_from_its_config_alone(capsys, tmp_path):
    from mpe.cli import main

    rc = main(
        [
            "plan",
            "--params",
            str(ROOT / "plans" / "laion400m-gemma2b.yaml"),
            "--model-config",
            str(ROOT / "plans" / "models" / "gemma-2b"),
            "--cluster",
            str(ROOT / "plans" / "clusters" / "h100x8.yaml"),
            "--cluster",
            str(ROOT / "plans" / "clusters" / "h100x64.yaml"),
            "--cache-dtype",
            "float16",
            "--cache-dtype",
            "float8_e4m3_row",
            "--samples",
            "400e6",
            "--caption-tokens",
            "20",
            "--image-bytes",
            "22724",
            "--json",
            str(tmp_path / "plan.json"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    plans = json.loads((tmp_path / "plan.json").read_text())
    assert [(p["cluster"], p["cache_dtype"]) for p in plans] == [
        ("8 × H100", "float16"),
        ("8 × H100", "float8_e4m3_row"),
        ("64 × H100", "float16"),
        ("64 × H100", "float8_e4m3_row"),
    ]
    f16, f8 = plans[0], plans[1]
    assert f16["work"]["hidden"] == 2048 and f16["work"]["trunk_layers"] == 17
    assert 0.5 < f8["cache_bytes"] / f16["cache_bytes"] < 0.52  # half, plus float8's per-row scales
    assert f16["cache_flops"] == f8["cache_flops"]
    assert (f16["steps"], plans[2]["steps"]) == (math.ceil(400e6 / 1024), math.ceil(400e6 / 8192))
    assert plans[2]["seconds"] < f16["seconds"]  # 64 GPUs finish sooner than 8
    assert "| 64 × H100 | float8_e4m3_row |" in out


def test_a_peak_file_reads_back_and_so_does_one_in_the_benchmarks_old_form(tmp_path):
    from mpe.runtime.peak import Peak, read_peak, write_peak

    peak = Peak({"float32": 1.8e11, "bfloat16": 2e9}, 1.2e10, 2, [[4096, 576, 1536]])
    write_peak(peak, tmp_path / "peak.json")
    assert read_peak(tmp_path / "peak.json") == peak and peak.best_precision() == "float32"
    old = {"threads": 2, "fp32_flops": 2.2e11, "bf16_flops": 9.88e11, "mem_bytes_per_s": 4.5e10}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert read_peak(tmp_path / "old.json").best_precision() == "bfloat16"
    assert read_peak(tmp_path / "missing.json") is None


def test_a_run_that_caches_nothing_is_refused_naming_the_keys(capsys):
    from mpe.cli import main

    cluster = str(ROOT / "plans" / "clusters" / "h100x8.yaml")
    rc = main(["plan", "--cluster", cluster, "--set", "cache.enabled=false", "--set", "model.text.tuning=lora"])
    err = capsys.readouterr().err
    assert rc == 2 and "cache.enabled: False" in err and len(err.strip().splitlines()) == 1, err
