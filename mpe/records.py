"""The records the stages hand each other, each with one owner (here): the files in the metrics folder,
the training summary the train stage writes and evaluate, register and reweight read, the MLflow metric
keys of an evaluation report (section prefixes, ``@`` ↔ ``_at_``), and the short names tables show.

A stage writes a record through this module and a reader reads it back through it, so a renamed field or
file breaks the one place that defines it, and a unit test round-trips every record.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from mpe.errors import StageInputError

# The files every stage writes in the metrics folder (params ``metrics_dir``).
SOURCES = "sources.json"  # stage sources: the URL list parts and their hashes
BASE_MODEL_SOURCE = "base_model_source.json"  # stage sources: the base LLM, a local folder by its content
VISION_SOURCE = "vision_source.json"  # stage sources: a pretrained vision tower's content (sha256)
DATA = "data.json"  # stage data: counts by split and by status class
CACHE = "cache.json"  # stage cache: shards computed and reused, precision, speed
TRAIN = "train.json"  # stage train: the TrainingSummary below
TRAIN_HISTORY = "train_history.json"  # stage train: one row per step (loss, timings)
EVAL = "eval.json"  # stage evaluate: the evaluation report
REGISTER = "register.json"  # stage register: version, alias, the gate's reason
REWEIGHT = "reweight.json"  # mpe reweight: the chosen aspect weights and their test gain
PEAK = "peak.json"  # benchmarks/peak.py: this machine's measured peak, which `mpe plan` reads


def metrics_file(metrics_dir: str | Path, name: str) -> Path:
    return Path(metrics_dir) / name


def read_metrics(metrics_dir: str | Path, name: str) -> dict | None:
    """A metrics file's JSON, or None when the stage that writes it has not run."""
    path = metrics_file(metrics_dir, name)
    return json.loads(path.read_text()) if path.exists() else None


@dataclass(frozen=True)
class TrainingSummary:
    """What the train stage reports (``metrics/train.json``); ``mlflow_run_id`` is the run the evaluate stage
    adds its numbers to, ``model_uri`` the logged model the register stage registers."""

    steps: int
    total_steps: int
    train_samples: int
    ray_run_name: str
    final_loss: float | None = None
    restored_from_step: int | None = None
    data_wait_share: float | None = None
    data_wait_share_after_first_step: float | None = None
    skipped_samples: dict = field(default_factory=dict)
    skipped_corrupt_shards: list = field(default_factory=list)
    compute_dtype: str | None = None
    start: dict = field(default_factory=dict)
    mlflow_run_id: str | None = None
    model_uri: str | None = None
    seconds: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, source: str | Path = TRAIN) -> TrainingSummary:
        known = {f.name for f in fields(cls)}
        missing = [
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING and f.name not in data
        ]
        if missing:
            raise StageInputError(
                f"{source}: lacks {', '.join(missing)} (not written by this mpe's train stage); rerun `mpe train`"
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def read(cls, metrics_dir: str | Path) -> TrainingSummary | None:
        data = read_metrics(metrics_dir, TRAIN)
        return None if data is None else cls.from_json(data, metrics_file(metrics_dir, TRAIN))


def training_run_id(metrics_dir: str | Path) -> str | None:
    """The MLflow run that trained the model in this project, if the train stage logged one."""
    # Only the run id is read: a train.json from another mpe version still names its run.
    data = read_metrics(metrics_dir, TRAIN)
    return data.get("mlflow_run_id") if data else None


# An evaluation report's sections and the MLflow metric-key prefix of each. ``trained`` is the model the
# pipeline trained (on the test split and the standard benchmarks); ``val`` the validation split.
SECTIONS = {
    "trained": "eval.",
    "untrained": "eval_untrained.",
    "analysis": "eval_analysis.",
    "untrained_analysis": "eval_untrained_analysis.",
    "val": "eval_val.",
    "reweight": "eval_reweight.",
}


def mlflow_key(name: str) -> str:
    """A metric or tag name as MLflow accepts it: ``@`` is not allowed there and becomes ``_at_``."""
    return name.replace("@", "_at_")


def metric_name(key: str) -> str:
    """The inverse of :func:`mlflow_key`."""
    return key.replace("_at_", "@")


def to_mlflow(sections: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{section: {metric: value}}`` as MLflow metric keys (``eval.text_to_image_R_at_1``)."""
    out = {}
    for section, metrics in sections.items():
        prefix = SECTIONS[section]
        out.update({mlflow_key(prefix + name): value for name, value in metrics.items()})
    return out


def from_mlflow(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """MLflow metric keys back into ``{section: {metric: value}}``; keys of no section are left out."""
    # longest prefix first: "eval_untrained_analysis." before "eval_untrained."
    prefixes = sorted(SECTIONS.items(), key=lambda kv: -len(kv[1]))
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        for section, prefix in prefixes:
            if key.startswith(prefix):
                out.setdefault(section, {})[metric_name(key[len(prefix) :])] = value
                break
    return out


def report_sections(report: dict) -> dict[str, dict[str, float]]:
    """An evaluation report (``eval.json``) as ``{section: {metric: value}}``, the form :func:`to_mlflow` logs:
    the trained and untrained models' metrics, their analyses, and the validation split's."""
    sections = {"trained": report["trained"]}
    if "untrained" in report:
        sections["untrained"] = report["untrained"]
    for model, section in (("trained", "analysis"), ("untrained", "untrained_analysis")):
        if model in report.get("analysis", {}):
            sections[section] = report["analysis"][model]
    if "val" in report:
        sections["val"] = report["val"]["trained"]
    return sections


def flat_name(section: str, metric: str) -> str:
    """How tables and suite files name a metric: the trained model's by itself, others as ``section.metric``
    (``analysis.inter_prompt_cosine``, ``val.text_to_image_R@1``)."""
    return metric if section == "trained" else f"{section}.{metric}"


# Short column names for the metrics tables show most.
SHORT = {
    "text_to_image_R@1": "t→i R@1",
    "text_to_image_R@5": "t→i R@5",
    "text_to_image_R@10": "t→i R@10",
    "image_to_text_R@1": "i→t R@1",
    "image_to_text_R@5": "i→t R@5",
    "image_to_text_R@10": "i→t R@10",
    "compositional_text_to_image_R@1": "comp. t→i R@1",
    "compositional_image_to_text_R@1": "comp. i→t R@1",
    "negation_accuracy": "negation",
    "zero_shot_shape_accuracy": "0-shot shape",
    "zero_shot_colour_accuracy": "0-shot colour",
    "caption_over_negated_accuracy": "caption>negated",
    "inter_prompt_cosine": "inter-prompt cos",
    "text_to_video_R@1": "t→v R@1",
    "text_to_video_R@5": "t→v R@5",
    "text_to_video_R@10": "t→v R@10",
    "video_to_text_R@1": "v→t R@1",
    "video_to_text_R@5": "v→t R@5",
    "video_to_text_R@10": "v→t R@10",
    "text_to_video_MdR": "t→v MdR",
    "text_to_video_MnR": "t→v MnR",
    "video_to_text_MdR": "v→t MdR",
    "video_to_text_MnR": "v→t MnR",
    "motion_video_to_text_accuracy": "motion v→t",
    "motion_text_to_video_accuracy": "motion t→v",
    "macro_accuracy": "macro acc.",
    "text_score": "text",
    "image_score": "image",
    "group_score": "group",
}
# Short names of a metric's section: the shapes world's own compositional sets, and the analysis section
# (whose names are unique on their own: ``aspect_shape_full``, ``probe_shape``).
SHORT_SECTIONS = {
    "shapes_sugarcrepe": "SugarCrepe",
    "shapes_aro_relation": "VG-R",
    "shapes_aro_attribution": "VG-A",
    "shapes_winoground": "Winoground",
    "analysis": "",
}


def short_name(metric: str) -> str:
    """A metric's short column name (``t→i R@5``); a section prefix is kept (``val.t→i R@5``), shortened where
    it has a short name (``SugarCrepe.swap_att``; none for ``analysis.``)."""
    section, _, name = metric.rpartition(".")
    short = SHORT.get(name, name)
    if name.startswith("aspect_") and name.endswith("_full"):
        short = f"{name[len('aspect_') : -len('_full')]} hard-neg"
    elif name.startswith("probe_") and not name.endswith("_chance"):
        short = f"probe {name[len('probe_') :]}"
    section = SHORT_SECTIONS.get(section, section)
    return f"{section}.{short}" if section else short
