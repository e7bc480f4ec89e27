"""Training checkpoints: the trainable weights (safetensors), the optimiser and scheduler state, and a
JSON state (step, loss history, data positions, run ids). The state records the sha256 of the two
weight files; reading verifies them, so a corrupt checkpoint is named instead of half-loaded, and
:func:`newest_intact` lets a resume fall back to the previous one. Nothing is unpickled."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mpe.errors import MpeError
from mpe.files.hashing import file_sha256

STATE_FILE, TRAINABLE_FILE, OPTIM_FILE = "state.json", "trainable.safetensors", "optim.pt"


class CheckpointCorrupt(MpeError):
    """A checkpoint's files do not match the hashes recorded when it was written."""


class NonFiniteWeights(MpeError):
    """Trained weights hold a NaN or an infinity: they are never exported."""


class WeightsMismatch(MpeError):
    """Weights to load do not fit the model (other parameter names or shapes): another architecture."""


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, state: dict[str, torch.Tensor], source: str = "the checkpoint") -> None:
    """Copy ``state`` into the model's parameters of the same names; ``source`` names it in the error a
    parameter the model lacks, or one of another shape, raises."""
    params = dict(model.named_parameters())
    unknown = [k for k in state if k not in params]
    reshaped = [k for k in state if k in params and tuple(state[k].shape) != tuple(params[k].shape)]
    if unknown or reshaped:
        what = f"parameters this model lacks ({', '.join(unknown[:3])})" if unknown else ""
        if reshaped:
            k = reshaped[0]
            what += (" and " if what else "") + (
                f"{len(reshaped)} of another shape ({k}: {tuple(state[k].shape)}, the model's {tuple(params[k].shape)})"
            )
        raise WeightsMismatch(f"{source} holds {what}: it was trained for another architecture")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def save_checkpoint(folder: Path, model, optimizer, scheduler, state: dict) -> None:
    save_file(trainable_state(model), str(folder / TRAINABLE_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, folder / OPTIM_FILE)
    files = {name: file_sha256(folder / name) for name in (TRAINABLE_FILE, OPTIM_FILE)}
    (folder / STATE_FILE).write_text(json.dumps({**state, "files": files}))


def read_checkpoint(folder: Path) -> tuple[dict, dict, dict]:
    """``(trainable weights, optimiser/scheduler state, JSON state)``, verified against the recorded hashes."""
    folder = Path(folder)
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointCorrupt(f"{folder / STATE_FILE}: unreadable ({err})") from None
    for name, sha in state.pop("files", {}).items():
        if not (folder / name).exists() or file_sha256(folder / name) != sha:
            raise CheckpointCorrupt(
                f"{folder / name}: does not match the sha256 recorded when it was written (truncated or changed)"
            )
    try:
        optim = torch.load(folder / OPTIM_FILE, weights_only=True)  # tensors and numbers only
        return load_file(str(folder / TRAINABLE_FILE)), optim, state
    except Exception as err:  # unreadable although no hash was recorded (an old checkpoint)
        raise CheckpointCorrupt(f"{folder}: unreadable checkpoint ({type(err).__name__}: {err})") from None


def non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """The names of the tensors of ``state`` that hold a NaN or an infinity."""
    return [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def recorded_compute_dtype(run_dir: Path) -> str | None:
    """The compute precision the newest checkpoint of a run folder records, if any: a resumed run keeps
    the precision it started with (its state file alone is read; the weights are verified on resume)."""
    for folder in sorted((p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir()), reverse=True):
        try:
            dtype = json.loads((folder / STATE_FILE).read_text()).get("compute_dtype")
        except (OSError, ValueError):
            continue
        if dtype in ("bfloat16", "float32"):
            return dtype
    return None


def newest_intact(run_dir: Path, exclude: Path | None = None) -> tuple[Path, tuple[dict, dict, dict]] | None:
    """The newest checkpoint folder of a Ray run folder that reads back intact (other than ``exclude``)."""
    candidates = sorted((p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir()), reverse=True)
    for folder in candidates:
        if exclude is not None and folder.resolve() == Path(exclude).resolve():
            continue
        try:
            return folder, read_checkpoint(folder)
        except CheckpointCorrupt:
            continue
    return None
