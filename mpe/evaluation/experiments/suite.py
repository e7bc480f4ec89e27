"""An experiment suite as data (``experiments/<name>.yaml``): a base params file, overrides for every
cell and for each budget ("form"), the cells, the seeds, the baseline row and the metrics to tabulate.

Each (cell, seed) becomes a full ``Params`` with its own output folders; what can be shared is: the
data (one world per data config, generated with the base seed, so seeds vary training only), the base
model (one per base config and number of APT tokens) and the cache (content-addressed keys under one
root). A row names only what defines it; what it implies is set here (a single-embedding pooling reads
one embedding with no negated prompts; LoRA trains every layer, so nothing is cached; no negation loss
needs no negated prompts; the vanilla CLIP text tower and LoRA have no frozen trunk to cache, and
trained APT rows change it every step).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, model_validator

from mpe.config import Params, StrictConfig
from mpe.errors import ConfigError
from mpe.files.hashing import fingerprint
from mpe.model.configuration import APT_POOLINGS, validate

SINGLE_EMBEDDING = ("mean", "last_token", "prompt_last_token", "vanilla_clip")
SUITES_DIR = "experiments"


class SuiteConfig(StrictConfig):
    name: str
    description: str = ""
    base: str = "params.yaml"
    seeds: list[int] = Field(min_length=1)
    baseline: str
    metrics: list[str] = Field(min_length=1)
    tables: dict[str, list[str]] = Field({}, description="more tables after the main one: title -> metrics")
    comparisons: list[tuple[str, str]] = Field(
        [], description="pairs of cells (a, b) whose per-seed differences a - b the report tabulates"
    )
    plot: list[str] = Field([], description="the metrics the plot shows (default: the main table's R@5 columns)")
    common: dict[str, Any] = {}
    forms: dict[str, dict[str, Any]] = {"quick": {}}
    cells: dict[str, dict[str, Any]] = Field(min_length=1)
    analyse: list[str] = []

    @model_validator(mode="after")
    def _check(self) -> SuiteConfig:
        for name in [self.baseline, *self.analyse, *(c for pair in self.comparisons for c in pair)]:
            if name not in self.cells:
                raise ValueError(f"'{name}' is not a cell (cells: {', '.join(self.cells)})")
        return self


def deep_merge(base: dict, *overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for ov in overrides:
        for k, v in (ov or {}).items():
            out[k] = (
                deep_merge(out.get(k) or {}, v)
                if isinstance(v, dict) and isinstance(out.get(k), dict)
                else copy.deepcopy(v)
            )
    return out


def implications(params: dict, row: dict) -> dict:
    """The keys a row implies unless it sets them itself (``{section: {key: value}}``, nested)."""
    text = params.get("model", {}).get("text", {})
    given = row.get("model", {}).get("text", {})
    implied: dict = {}

    def put(path: list[str], value) -> None:
        node = implied
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value

    pooling = text.get("pooling", "multi_prompt")
    if pooling in SINGLE_EMBEDDING and "num_prompts" not in given:
        put(["model", "text", "num_prompts"], 1)
    if (
        pooling not in ("multi_prompt",) or params.get("model", {}).get("loss", {}).get("lambda_neg", 1.0) == 0
    ) and "negation" not in given:
        put(["model", "text", "negation"], False)
    if (text.get("tuning") == "lora" or pooling == "vanilla_clip") and "enabled" not in row.get("cache", {}):
        put(["cache", "enabled"], False)  # nothing of a frozen trunk to cache
    if text.get("train_apt_embeddings") and "enabled" not in row.get("cache", {}):
        put(["cache", "enabled"], False)  # trained APT rows change the trunk states every step
    return implied


@dataclass
class RunSpec:
    """One (cell, seed) of a suite: its full params and where its outputs go."""

    cell: str
    seed: int
    params: Params
    data_params: Params  # the same data, with the base seed (the world does not change with the seed)
    implied: dict


def load_suite(path: str | Path) -> SuiteConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such suite file (suites live in {SUITES_DIR}/<name>.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return validate(SuiteConfig, data, str(path))


def suite_path(name: str, project: Path = Path(".")) -> Path:
    return project / SUITES_DIR / f"{name}.yaml"


def expand(suite: SuiteConfig, form: str, project: Path = Path("."), parent_run_id: str = "") -> list[RunSpec]:
    """Every (cell, seed) of ``form`` as validated params; errors name the suite file, the cell and the key."""
    if form not in suite.forms:
        raise ConfigError(f"suite {suite.name}: no form '{form}' (forms: {', '.join(suite.forms)})")
    base_file = project / suite.base
    base = yaml.safe_load(base_file.read_text()) or {}
    base_seed = base.get("seed", 0)
    root = f"{SUITES_DIR}/{suite.name}"
    runs = []
    for cell, row in suite.cells.items():
        merged = deep_merge(base, suite.common, suite.forms[form], row)
        implied = implications(merged, row)
        merged = deep_merge(merged, implied)
        data_key = fingerprint({"data": merged.get("data", {}), "seed": base_seed}, 10)
        text = merged.get("model", {}).get("text", {})
        apt = text.get("num_prompts", 4) if text.get("pooling", "multi_prompt") in APT_POOLINGS else 0
        base_key = fingerprint(
            {"base_model": merged.get("base_model", {}), "apt": apt, "apt_seed": text.get("apt_init_seed", 0)}, 10
        )
        for seed in suite.seeds:
            tag = f"{root}/runs/{form}/{cell}/seed{seed}"
            d = deep_merge(
                merged,
                {
                    "seed": seed,
                    "data": {"out_dir": f"{root}/data-{data_key}"},
                    "base_model": {"out_dir": f"{root}/base-{base_key}"},
                    "cache": {"root": f"{root}/cache"},
                    "train": {
                        "storage_path": f"{root}/ray_results",
                        "run_name": f"{suite.name}-{form}-{cell}-s{seed}",
                        "out_dir": f"{tag}/model",
                    },
                    "metrics_dir": f"{tag}/metrics",
                    "evaluate": {"plots_dir": f"{tag}/plots"},
                    "mlflow": {
                        "tags": {
                            "mpe.suite": suite.name,
                            "mpe.form": form,
                            "mpe.cell": cell,
                            "mpe.seed": str(seed),
                            **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}),
                        }
                    },
                },
            )
            source = f"{suite_path(suite.name, project)} (cell {cell})"
            params = validate(Params, d, source)
            data_params = validate(Params, {**d, "seed": base_seed}, source)
            runs.append(RunSpec(cell, seed, params, data_params, implied))
    return runs
