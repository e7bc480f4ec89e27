"""A local pretrained SigLIP or CLIP vision checkpoint: its ViT (safetensors only, nothing downloaded,
no remote code) and its image preprocessing, read from and written back to a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

from mpe.errors import ConfigError
from mpe.files.atomic import write_json
from mpe.model.configuration import VisionConfig, read_vision_checkpoint
from mpe.model.vision.preprocess import ImageTransform

PROCESSOR_FILE = "preprocessor_config.json"


def _classes(family: str):
    """``(model class, PIL image processor class, processor type name)`` of ``siglip`` or ``clip``."""
    if family == "siglip":
        from transformers import SiglipImageProcessorPil, SiglipVisionModel

        return SiglipVisionModel, SiglipImageProcessorPil, "SiglipImageProcessor"
    from transformers import CLIPImageProcessorPil, CLIPVisionModel

    return CLIPVisionModel, CLIPImageProcessorPil, "CLIPImageProcessor"


def _family(vision_config) -> str:
    return "siglip" if vision_config.model_type.startswith("siglip") else "clip"


def read_transform(folder: Path, family: str, image_size: int) -> ImageTransform:
    """The checkpoint's preprocessing, read through transformers' own PIL processor class (so its
    defaults and legacy forms apply); settings this module cannot reproduce are refused."""
    proc = _classes(family)[1].from_pretrained(str(folder), local_files_only=True)
    where = folder / PROCESSOR_FILE
    if not proc.do_resize:
        raise ConfigError(f"{where}: do_resize false is not supported (images arrive at the data stage's size)")
    size, crop = proc.size, proc.crop_size if proc.do_center_crop else None
    if size.shortest_edge and not size.longest_edge:
        if crop is None or crop.height != crop.width or crop.height > size.shortest_edge:
            raise ConfigError(f"{where}: shortest_edge resize needs a square centre crop no larger than it")
        transform_size, short = crop.height, size.shortest_edge
    elif size.height and size.width and size.height == size.width and crop is None:
        transform_size, short = size.height, None
    else:
        raise ConfigError(
            f"{where}: unsupported resize {proc.size} / crop {proc.crop_size}: expected "
            "{height = width} or {shortest_edge} with a square centre crop"
        )
    if transform_size != image_size:
        raise ConfigError(
            f"{where}: the processor makes {transform_size}px images but the model expects image_size {image_size}"
        )
    mean = tuple(proc.image_mean) if proc.do_normalize else (0.0, 0.0, 0.0)
    std = tuple(proc.image_std) if proc.do_normalize else (1.0, 1.0, 1.0)
    return ImageTransform(
        size=transform_size,
        short_side=short,
        resample=int(proc.resample),
        rescale=proc.rescale_factor if proc.do_rescale else 1.0,
        mean=mean,
        std=std,
    )


def load_vision(folder: str | Path):
    """``(vit, transform)`` of a local checkpoint folder (vision-only, or the vision part of a full model)."""
    folder = Path(folder)
    try:
        vcfg = read_vision_checkpoint(folder)
    except ValueError as err:
        raise ConfigError(f"model.vision.pretrained: {err}") from None
    family = _family(vcfg)
    model_cls = _classes(family)[0]
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a full checkpoint's text tower is reported as unexpected keys: it is
    try:
        vit, info = model_cls.from_pretrained(
            str(folder),
            config=vcfg,
            use_safetensors=True,
            local_files_only=True,
            trust_remote_code=False,
            output_loading_info=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ConfigError(
            f"model.vision.pretrained: {folder}: the weights do not fit its config (missing "
            f"{sorted(info['missing_keys'])[:5]}, mismatched {sorted(info['mismatched_keys'])[:5]})"
        )
    return vit, read_transform(folder, family, vcfg.image_size)


def save_vision(vit, transform: ImageTransform, folder: Path) -> None:
    """A plain transformers checkpoint of ``vit`` (safetensors) with the processor config of ``transform``."""
    vit.save_pretrained(str(folder))
    proc = {
        "image_processor_type": _classes(_family(vit.config))[2],
        "do_resize": True,
        "resample": transform.resample,
        "do_rescale": True,
        "rescale_factor": transform.rescale,
        "do_normalize": True,
        "image_mean": list(transform.mean),
        "image_std": list(transform.std),
        "do_convert_rgb": True,
    }
    if transform.short_side is None:
        proc.update(size={"height": transform.size, "width": transform.size}, do_center_crop=False)
    else:
        proc.update(
            size={"shortest_edge": transform.short_side},
            do_center_crop=True,
            crop_size={"height": transform.size, "width": transform.size},
        )
    write_json(folder / PROCESSOR_FILE, proc)


def transform_of(cfg: VisionConfig) -> ImageTransform:
    """The preprocessing of the tower ``cfg`` describes, without loading its weights."""
    if not cfg.pretrained:
        return ImageTransform.own(cfg.image_size)
    vcfg = read_vision_checkpoint(cfg.pretrained)
    return read_transform(Path(cfg.pretrained), _family(vcfg), vcfg.image_size)
