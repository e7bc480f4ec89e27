"""open_clip 3.3.0's loss module, loaded from its file (the package is installed --no-deps)."""

import importlib.util
from pathlib import Path


def load_open_clip_loss():
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise RuntimeError("open-clip-torch==3.3.0 is needed for the reference (make install does it)")
    path = Path(list(spec.submodule_search_locations)[0]) / "loss.py"
    mod_spec = importlib.util.spec_from_file_location("open_clip_loss_reference", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod
