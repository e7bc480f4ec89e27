"""Where a training run starts (``train.init_from``): ``scratch``, the base model with new heads drawn from
the seed, or ``champion``, the trainable weights of the registry's ``@champion`` (read from its safetensors
files; nothing is unpickled) with a fresh optimiser and schedule for this run's steps.

The champion, not ``models/trained``: the champion is the model that passed the promotion gate, while the
last trained model may be a refused challenger, and ``models/trained`` is the train stage's own DVC output,
which cannot also be its input. What the run started from enters its fingerprint, so a resume never mixes
two starts."""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import save as safetensors_bytes

from mpe.errors import ConfigError, MpeError
from mpe.model.configuration import ModelConfig
from mpe.model.multi_prompt_clip import CONFIG_FILE, MultiPromptCLIP
from mpe.serving.mlflow_model import download_model_folder
from mpe.tracking.runs import use
from mpe.tracking.settings import TrackingSettings
from mpe.training.checkpoint import trainable_state

# model settings that leave the trainable weights' names and shapes as they are: continuing may change them
FREE_TO_CHANGE = {"loss"}


def scratch() -> tuple[None, dict]:
    return None, {"init_from": "scratch"}


def _comparable(model: dict) -> dict:
    """A model configuration as two runs of one architecture share it: a pretrained vision tower is named by
    its path in params and by ``vision_model`` in a saved model, and either way the checkpoint's sizes
    stand in the configuration beside it."""
    vision = dict(model.get("vision") or {})
    vision["pretrained"] = bool(vision.get("pretrained"))
    return {**model, "vision": vision}


def _unreadable(model_name: str, version: str, err: BaseException) -> ConfigError:
    first = (str(err).splitlines() or [type(err).__name__])[0][:300]
    return ConfigError(
        f"train.init_from: champion: {model_name} version {version}: its model files cannot be read "
        f"({type(err).__name__}: {first}); restore them or set train.init_from: scratch"
    )


def _files_unreadable(err: BaseException) -> bool:
    """Whether ``err`` says that a model file is missing or damaged (safetensors raises its own type)."""
    import mlflow

    known = (OSError, ValueError, MpeError, mlflow.exceptions.MlflowException)
    return isinstance(err, known) or type(err).__name__ == "SafetensorError"


def champion_start(
    settings: TrackingSettings, model_name: str, model: ModelConfig, base_model: str
) -> tuple[bytes | None, dict]:
    """The champion's trainable weights as safetensors bytes and what they are (version, sha256); with no
    champion yet, ``None`` and a note: the first run of a registry trains from scratch."""
    import mlflow

    if model.text.tuning == "lora":
        raise ConfigError(
            "train.init_from: champion needs model.text.tuning: top (a registered LoRA model is "
            "stored merged, so its adapters cannot be continued)"
        )
    client = use(settings)
    try:
        version = client.get_model_version_by_alias(model_name, "champion")
    except mlflow.exceptions.MlflowException:
        return None, {
            "init_from": "champion",
            "version": None,
            "note": f"{model_name} has no @champion yet: trained from scratch",
        }
    try:
        folder = download_model_folder(f"models:/{model_name}/{version.version}")
        meta = json.loads((folder / CONFIG_FILE).read_text())
    except Exception as err:
        if not _files_unreadable(err):
            raise
        raise _unreadable(model_name, version.version, err) from None
    want, theirs_model = _comparable(model.model_dump(mode="json")), _comparable(meta.get("model", {}))
    diff = sorted(
        k for k in set(want) | set(theirs_model) if k not in FREE_TO_CHANGE and theirs_model.get(k) != want.get(k)
    )
    if diff:
        raise ConfigError(
            f"train.init_from: champion: {model_name} version {version.version} has another model "
            f"(differs in model.{', model.'.join(diff)}); set train.init_from: scratch"
        )
    theirs = meta.get("provenance", {}).get("base_model")
    if theirs != base_model:
        raise ConfigError(
            f"train.init_from: champion: {model_name} version {version.version} was trained on base "
            f"model {theirs}, this run uses {base_model}; set train.init_from: scratch"
        )
    try:
        state = trainable_state(MultiPromptCLIP.from_pretrained(folder, dtype=torch.float32))
    except Exception as err:
        if not _files_unreadable(err):
            raise
        raise _unreadable(model_name, version.version, err) from None
    blob = safetensors_bytes(state)
    return blob, {
        "init_from": "champion",
        "version": str(version.version),
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
    }
