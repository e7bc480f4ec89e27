"""A cluster description for the planner: nodes, accelerators per node and their peak (stated, or measured on
this machine), CPU cores, the network and storage bandwidth, and the utilisation and fixed costs the plan
assumes for each stage. A YAML file (``plans/clusters/*.yaml``), validated like params: an unknown or bad
key fails naming the file and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from mpe.model.configuration import StrictConfig, validate

Precision = Literal["float32", "bfloat16"]


class AcceleratorSpec(StrictConfig):
    """One node's accelerators: their kind, how many, and each one's attainable peak."""

    kind: str = Field(description="a name for tables (H100-SXM, cpu)")
    per_node: int = Field(1, ge=1)
    peak_tflops: dict[Precision, float] | Literal["measured"] = Field(
        description="dense matmul TFLOP/s of one accelerator by precision, or 'measured': this machine's "
        "CPU, measured now (mpe.runtime.peak; all cores are one accelerator)"
    )
    peak_source: str = Field("", description="where a stated peak comes from (a datasheet, a GPU check run)")
    memory_gib: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> AcceleratorSpec:
        if isinstance(self.peak_tflops, dict) and not self.peak_tflops:
            raise ValueError("peak_tflops: name at least one precision (float32, bfloat16) or say 'measured'")
        return self


class StageShares(StrictConfig):
    """A figure per compute stage."""

    cache: float = Field(gt=0, le=1)
    train: float = Field(gt=0, le=1)
    evaluate: float = Field(gt=0, le=1)


class StageSeconds(StrictConfig):
    """Fixed seconds per stage, beyond its work: process and Ray start-up, model loading, export, logging."""

    data: float = Field(0, ge=0)
    base_model: float = Field(0, ge=0)
    cache: float = Field(0, ge=0)
    train: float = Field(0, ge=0)
    evaluate: float = Field(0, ge=0)


class ClusterSpec(StrictConfig):
    """Where a plan runs."""

    name: str
    nodes: int = Field(1, ge=1)
    accelerator: AcceleratorSpec
    precision: Precision | Literal["best"] = Field(
        "best", description="what the compute stages run in; best: the precision with the higher peak"
    )
    cpus_per_node: int = Field(ge=1)
    network_gbit_per_s: float = Field(gt=0, description="each node's bandwidth to the internet (the download)")
    storage_gbyte_per_s: float = Field(
        gt=0, description="the shared storage's aggregate bandwidth (shards, cache, checkpoints)"
    )
    download_images_per_s_per_core: float = Field(
        gt=0, description="img2dataset's resize and encode rate on one core (the download's CPU bound)"
    )
    utilisation: StageShares = Field(description="share of the accelerators' peak each stage attains (stated)")
    overhead_s: StageSeconds = StageSeconds()
    notes: str = ""

    @property
    def accelerators(self) -> int:
        return self.nodes * self.accelerator.per_node


def load_cluster(path: str | Path) -> ClusterSpec:
    """Read and validate a cluster description (a ConfigError names the file and the key)."""
    from mpe.config import read_params_file

    return validate(ClusterSpec, read_params_file(path), str(path))
