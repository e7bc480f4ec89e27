"""Loading and saving the decoder LLM as a plain transformers checkpoint (safetensors + tokenizer)."""

from __future__ import annotations

from pathlib import Path

import torch

from mpe.errors import MpeError


class LMFolderError(MpeError):
    """A decoder checkpoint folder that cannot be loaded; the message names it."""


def load_lm(path: str | Path, attn_implementation: str = "sdpa", dtype=torch.float32, trust_remote_code: bool = False):
    """Load ``(lm, tokenizer)`` from a checkpoint folder, in ``dtype`` for compute."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():  # else transformers takes the path for a hub id and goes online
        missing = "the folder is missing" if not path.is_dir() else "it holds no config.json"
        raise LMFolderError(f"{path}: not a transformers checkpoint folder ({missing}); prepare or download it again")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        lm = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
    except Exception as err:  # transformers and safetensors raise several types for a damaged folder
        if type(err).__name__ == "SafetensorError" or "safetensors" in str(err).lower():
            raise LMFolderError(
                f"{path}: the checkpoint's weights are unreadable (truncated or corrupt: {err}); "
                "prepare or download it again"
            ) from None
        if isinstance(err, (OSError, ValueError, TypeError, KeyError)):  # a damaged config or tokenizer file
            first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
            raise LMFolderError(
                f"{path}: not a loadable checkpoint ({type(err).__name__}: {first[:200]}); prepare or download it again"
            ) from None
        raise
    lm.eval()
    return lm, tokenizer


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
