"""A CPU smoke test: a tiny model trains for a few dozen steps of ``train_step`` on an in-memory batch;
its loss falls, through the cached-trunk path as well as the full pass."""

import pytest
import torch
from PIL import Image, ImageDraw

from mpe.training.optim import build_optimizer, build_scheduler, param_groups
from mpe.training.step import Batch, train_step
from tests.unit.test_model import tiny_model

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
SHAPES = ["circle", "square"]


def toy_batch():
    imgs, caps = [], []
    for c, rgb in COLOURS.items():
        for s in SHAPES:
            im = Image.new("RGB", (32, 32), (128, 128, 128))
            d = ImageDraw.Draw(im)
            (d.ellipse if s == "circle" else d.rectangle)([6, 6, 26, 26], fill=rgb)
            imgs.append(im)
            caps.append(f"a {c} {s}")
    return imgs, caps


@pytest.mark.parametrize("cached", [False, True])
def test_loss_falls(tokenizer, cached):
    torch.manual_seed(0)
    model = tiny_model(tokenizer).train()
    imgs, caps = toy_batch()
    pixels = model.pixel_values(imgs)
    opt = build_optimizer(model, lr=2e-3, weight_decay=0.1)
    sched = build_scheduler(opt, warmup=5, total=40)
    trainable = [p for p in model.parameters() if p.requires_grad]
    batch = Batch(pixels, captions=caps)
    if cached:
        tokens = model.text.tokenize(caps)
        with torch.no_grad():
            states = model.text.trunk(tokens)
        lens = tokens.caption_lens.tolist()
        # the cache would store each caption unpadded: re-pad from those rows
        states = torch.nn.utils.rnn.pad_sequence(
            [states[i, -(lens[i] + model.text.layout.segments_len) :] for i in range(len(caps))],
            batch_first=True,
            padding_side="left",
        )
        batch = Batch(pixels, states=states, caption_lens=lens)
    losses = [train_step(model, batch, opt, sched, trainable, grad_clip=1.0)["loss"] for _ in range(40)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.5 * first, losses


def test_no_weight_decay_on_norms_biases_scales(tokenizer):
    model = tiny_model(tokenizer)
    decay, no_decay = param_groups(model, 0.1)
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    named = dict(model.named_parameters())
    assert id(named["logit_scale"]) in ids(no_decay)
    assert id(named["text.lm.model.norm.weight"]) in ids(no_decay)
    assert id(named["text.proj.0.bias"]) in ids(no_decay)
    assert id(named["text.proj.0.weight"]) in ids(decay)
