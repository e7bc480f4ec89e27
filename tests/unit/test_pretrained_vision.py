"""A pretrained vision tower (``model.vision.pretrained``): tiny random SigLIP (vision-only) and CLIP
(full two-tower) checkpoints written by the test, checked against transformers' own forward and PIL
image processor, frozen vs trained, save → load without the checkpoint, and config errors."""

import base64
import copy
import io
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from mpe.config import ModelConfig, load_params
from mpe.errors import ConfigError
from mpe.evaluation.tasks import prompt_patch_maps
from mpe.model.multi_prompt_clip import MultiPromptCLIP
from mpe.model.text.vanilla_clip import VanillaCLIPTextTower
from mpe.model.vision.tower import VisionTower
from mpe.training.optim import build_optimizer, build_scheduler
from mpe.training.step import Batch, train_step

VIT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
)


def _scale_up(model):
    """Random init is near-identity; larger weights make the towers (and any bug) show."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``{"siglip": vision-only SigLIP folder, "clip": full CLIPModel folder}`` with processor configs."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    root = tmp_path_factory.mktemp("vision-ckpts")
    sig = SiglipVisionModel(SiglipVisionConfig(**VIT))
    _scale_up(sig)
    sig.save_pretrained(root / "siglip")
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(root / "siglip")
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    clip = CLIPModel(CLIPConfig(vision_config=VIT, text_config=text, projection_dim=16))
    _scale_up(clip)
    clip.save_pretrained(root / "clip")
    # CLIP's own resize: short side to 36, centre crop 32, OpenAI mean/std (the class defaults)
    CLIPImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "clip"
    )
    return {"siglip": root / "siglip", "clip": root / "clip"}


def _cfg(folder, freeze=False) -> ModelConfig:
    """The vision tower under test beside a one-layer vanilla CLIP text tower (the text side is not the point)."""
    return ModelConfig(
        embed_dim=48,
        text={
            "pooling": "vanilla_clip",
            "num_prompts": 1,
            "negation": False,
            "vanilla": {"width": 16, "layers": 1, "heads": 2, "context_length": 16},
        },
        vision={"pretrained": str(folder), "freeze": freeze},
    )


def _model(tokenizer, folder, freeze=False):
    cfg = _cfg(folder, freeze)
    torch.manual_seed(0)
    return MultiPromptCLIP(
        cfg,
        VanillaCLIPTextTower(copy.deepcopy(tokenizer), cfg.text.vanilla, cfg.embed_dim),
        VisionTower(cfg.vision, cfg.embed_dim),
    )


def _images():
    """Sizes other than the tower's: the processor resizes (and crops) them."""
    out = []
    for i, (w, h) in enumerate([(40, 36), (30, 52), (64, 64), (33, 20)]):
        im = Image.new("RGB", (w, h), (30 * i, 90, 200 - 40 * i))
        ImageDraw.Draw(im).ellipse([4, 3, w - 6, h - 4], fill=(220 - 50 * i, 40 * i, 60))
        out.append(im)
    return out


@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_embeddings_equal_the_hf_forward_on_the_processors_pixels(tokenizer, checkpoints, family):
    from transformers import AutoImageProcessor, CLIPModel, SiglipVisionModel

    folder = checkpoints[family]
    model = _model(tokenizer, folder).eval()
    assert model.cfg.vision.image_size == 32 and model.cfg.vision.hidden_size == 32  # read from the checkpoint
    imgs = _images()
    ref_pixels = AutoImageProcessor.from_pretrained(folder, backend="pil")(imgs, return_tensors="pt")["pixel_values"]
    assert torch.allclose(model.pixel_values(imgs), ref_pixels, atol=1e-5)
    with torch.no_grad():
        if family == "siglip":
            pooled = SiglipVisionModel.from_pretrained(folder)(pixel_values=ref_pixels).pooler_output
        else:
            pooled = CLIPModel.from_pretrained(folder).vision_model(pixel_values=ref_pixels).pooler_output
        ref = F.normalize(model.vision.proj(pooled), dim=-1)
        got = model.encode_image(imgs)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    texts = ["a red circle"] * len(imgs)
    with torch.no_grad():
        maps = prompt_patch_maps(model, imgs, model.encode_text(texts))
    assert maps.shape == (len(imgs), 1, 4, 4)  # 16 patches: CLIP's class token is not one of them
    assert torch.isfinite(maps).all()


def _toy_batch(model):
    imgs = _images() * 2
    caps = [f"a {c} shape number {i}" for i, c in enumerate(["red", "green", "blue", "pink"] * 2)]
    return Batch(model.pixel_values(imgs), captions=caps)


@pytest.mark.parametrize("family,freeze", [("siglip", True), ("clip", True), ("clip", False)])
def test_frozen_tower_stays_bit_identical_and_trained_one_moves(tokenizer, checkpoints, family, freeze):
    model = _model(tokenizer, checkpoints[family], freeze=freeze).train()
    vit_before = {k: v.clone() for k, v in model.vision.vit.state_dict().items()}
    proj_before = model.vision.proj.weight.detach().clone()
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all((id(p) in held) != freeze for p in model.vision.vit.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    sched = build_scheduler(opt, warmup=0, total=10)
    batch = _toy_batch(model)
    for _ in range(2):
        train_step(model, batch, opt, sched, trainable, grad_clip=1.0)
    after = model.vision.vit.state_dict()
    if freeze:
        assert all(torch.equal(vit_before[k], after[k]) for k in after)
        assert all(p.grad is None for p in model.vision.vit.parameters())
        assert not model.vision.vit.training  # a locked tower stays in eval mode
    else:
        assert sum(not torch.equal(vit_before[k], after[k]) for k in after) > len(after) // 2
    assert not torch.equal(proj_before, model.vision.proj.weight)


def test_saved_model_loads_without_the_checkpoint_folder(tiny_base_dir, checkpoints, tmp_path):
    from mlflow.pyfunc import PythonModelContext

    from mpe.serving.pyfunc import MultiPromptEmbedder

    ckpt = shutil.copytree(checkpoints["clip"], tmp_path / "clip-copy")
    model = MultiPromptCLIP.from_base(tiny_base_dir, _cfg(ckpt), seed=0).train()  # as the train stage builds it
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    train_step(model, _toy_batch(model), opt, build_scheduler(opt, 0, 5), trainable, grad_clip=1.0)  # tuned ≠ file
    model.eval()
    imgs = _images()
    with torch.no_grad():
        want = model.encode_image(imgs)
    model.save_pretrained(tmp_path / "saved")
    shutil.rmtree(ckpt)
    meta = json.loads((tmp_path / "saved" / "mpe_config.json").read_text())
    assert meta["model"]["vision"]["pretrained"] == "vision_model"  # no path of this machine
    assert meta["provenance"]["vision_pretrained"] == "clip-copy"
    assert not list((tmp_path / "saved").rglob("*.bin")) and not list((tmp_path / "saved").rglob("*.pt"))
    loaded = MultiPromptCLIP.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(imgs), want)
    pyfunc = MultiPromptEmbedder()
    pyfunc.load_context(PythonModelContext({"mpe_model": str(tmp_path / "saved")}, None))
    buf = io.BytesIO()
    imgs[1].save(buf, format="PNG")
    import pandas as pd

    out = pyfunc.predict(None, pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()]}))
    assert torch.allclose(torch.from_numpy(out[0]), want[1], atol=1e-6)


def _params_error(tmp_path, vision: str) -> str:
    f = tmp_path / "params.yaml"
    f.write_text(f"model:\n  vision:\n{vision}")
    with pytest.raises(ConfigError) as err:
        load_params(f)
    return str(err.value)


def test_config_errors_name_the_key_and_path(tmp_path, checkpoints):
    missing = tmp_path / "nowhere"
    msg = _params_error(tmp_path, f"    pretrained: {missing}\n")
    assert "model.vision.pretrained" in msg and str(missing) in msg and "no such folder" in msg
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    msg = _params_error(tmp_path, f"    pretrained: {bert}\n")
    assert "model.vision.pretrained" in msg and str(bert / "config.json") in msg and "'bert'" in msg
    two_tower = tmp_path / "no-vision"
    two_tower.mkdir()
    (two_tower / "config.json").write_text(json.dumps({"model_type": "siglip", "text_config": {}}))
    msg = _params_error(tmp_path, f"    pretrained: {two_tower}\n")
    assert "model.vision.pretrained" in msg and "without a vision_config" in msg
    msg = _params_error(tmp_path, f"    pretrained: {checkpoints['siglip']}\n    image_size: 64\n")
    assert "model.vision" in msg and "image_size is 64 but the checkpoint has 32" in msg
    msg = _params_error(tmp_path, "    freeze: true\n")
    assert "model.vision" in msg and "freeze needs a pretrained tower" in msg
    # an explicit value that agrees with the checkpoint is fine
    f = tmp_path / "params.yaml"
    f.write_text(f"model:\n  vision:\n    pretrained: {checkpoints['siglip']}\n    image_size: 32\n")
    assert load_params(f).model.vision.num_layers == 1


def test_untrained_twin_of_a_tuned_tower_starts_from_the_original_checkpoint(checkpoints):
    from mpe.stages.evaluate import _untrained_twin

    saved, original = str(checkpoints["siglip"]), str(checkpoints["clip"])  # two readable folders
    assert _untrained_twin(_cfg(saved), original).vision.pretrained == original
    assert _untrained_twin(_cfg(saved, freeze=True), original).vision.pretrained == saved  # frozen: the same weights
    assert _untrained_twin(_cfg(saved), None).vision.pretrained == saved
