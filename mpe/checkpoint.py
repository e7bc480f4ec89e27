"""Training checkpoints: the trainable weights (safetensors), the optimiser and scheduler state, and a
JSON state (step, loss history, run ids). Nothing is unpickled when reading one back."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_FILE, TRAINABLE_FILE, OPTIM_FILE = "state.json", "trainable.safetensors", "optim.pt"


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    unknown = [k for k in state if k not in params]
    if unknown:
        raise KeyError(f"checkpoint holds parameters this model lacks: {unknown[:5]}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def save_checkpoint(folder: Path, model, optimizer, scheduler, state: dict) -> None:
    save_file(trainable_state(model), str(folder / TRAINABLE_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, folder / OPTIM_FILE)
    (folder / STATE_FILE).write_text(json.dumps(state))


def read_checkpoint(folder: Path) -> tuple[dict, dict, dict]:
    """``(trainable weights, optimiser/scheduler state, JSON state)`` of a checkpoint folder."""
    optim = torch.load(folder / OPTIM_FILE, weights_only=True)  # tensors and numbers only
    return load_file(str(folder / TRAINABLE_FILE)), optim, json.loads((folder / STATE_FILE).read_text())
