"""Guards of the training step and its checkpoints on a small model, one process: a non-finite loss stops
the step before the optimiser and names the samples, weights of another architecture are one line, and a
resumed run keeps the precision its checkpoints record."""

import copy
import json

import pytest
import torch

from mpe.model.configuration import ModelConfig
from mpe.model.multi_prompt_clip import MultiPromptCLIP
from mpe.model.text.vanilla_clip import VanillaCLIPTextTower
from mpe.model.vision.tower import VisionTower
from mpe.training.checkpoint import WeightsMismatch, load_trainable, non_finite, recorded_compute_dtype
from mpe.training.optim import build_optimizer, build_scheduler
from mpe.training.step import Batch, NonFiniteStep, train_step


def _model(tokenizer, embed_dim: int = 16) -> MultiPromptCLIP:
    cfg = ModelConfig(
        embed_dim=embed_dim,
        text={
            "pooling": "vanilla_clip",
            "num_prompts": 1,
            "negation": False,
            "vanilla": {"width": 16, "layers": 1, "heads": 2, "context_length": 16},
        },
        vision={
            "image_size": 16,
            "patch_size": 8,
            "hidden_size": 16,
            "num_layers": 1,
            "num_heads": 2,
            "intermediate_size": 32,
        },
    )
    torch.manual_seed(0)
    text = VanillaCLIPTextTower(copy.deepcopy(tokenizer), cfg.text.vanilla, cfg.embed_dim)
    return MultiPromptCLIP(cfg, text, VisionTower(cfg.vision, cfg.embed_dim)).train()


def test_a_non_finite_input_stops_the_step_before_the_optimiser_and_names_its_rows(tokenizer):
    model = _model(tokenizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    sched = build_scheduler(opt, warmup=0, total=10)
    pixels = torch.randn(4, 3, 16, 16)
    captions = ["a red circle", "a blue square", "a green star", "a pink moon"]
    train_step(model, Batch(pixels, captions=captions), opt, sched, trainable, grad_clip=1.0)  # a finite step
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr = sched.get_last_lr()
    pixels[2, 0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteStep) as err:
        train_step(model, Batch(pixels, captions=captions), opt, sched, trainable, grad_clip=1.0)
    assert err.value.rows == [2] and err.value.workers == 1
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # the optimiser never stepped
    assert sched.get_last_lr() == lr and non_finite(dict(model.named_parameters())) == []


def test_weights_of_another_architecture_are_one_line(tokenizer):
    from mpe.training.checkpoint import trainable_state

    with pytest.raises(WeightsMismatch, match="another shape .* another architecture") as err:
        load_trainable(_model(tokenizer, 16), trainable_state(_model(tokenizer, 32)), "champion version 3")
    assert str(err.value).startswith("champion version 3 holds") and "\n" not in str(err.value)
    with pytest.raises(WeightsMismatch, match="parameters this model lacks \\(extra\\)"):
        load_trainable(_model(tokenizer), {"extra": torch.zeros(1)})


def test_a_resumed_run_keeps_the_precision_its_newest_readable_checkpoint_records(tmp_path):
    assert recorded_compute_dtype(tmp_path) is None
    for step, state in [(2, {"compute_dtype": "bfloat16"}), (4, None)]:
        folder = tmp_path / f"checkpoint_00000{step}"
        folder.mkdir()
        (folder / "state.json").write_text(json.dumps(state) if state else "{ torn")
    assert recorded_compute_dtype(tmp_path) == "bfloat16"
