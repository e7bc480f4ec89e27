"""Stage ``search_index`` (run by the retrain flow after ``register``, and by ``mpe index``): the search index
over the data stage's images, embedded by the trained model (or any model folder or registry URI). The
index names the model it came from (its sha256); after a registration it is logged to that version's
training run and the version's tag ``mpe.search_index`` points at it, so ``mpe serve`` finds the index of
the very version it serves. An index already built from the same model and settings is kept."""

from __future__ import annotations

from pathlib import Path

from mpe.config import Params
from mpe.errors import ConfigError
from mpe.serving.image_index import build_index, model_sha256, read_meta
from mpe.serving.mlflow_model import log_search_index
from mpe.serving.server import model_folder
from mpe.tracking.settings import tracking_settings


def _current(out: Path, sha256: str, params: Params) -> dict | None:
    """The index in ``out`` if it was built from this model with these settings."""
    try:
        meta = read_meta(out)
    except ConfigError:
        return None
    same = (
        meta["model"]["sha256"] == sha256
        and meta["splits"] == list(params.search.splits)
        and meta.get("requested_key", "auto") == params.search.index_key
        and meta.get("data_root") == str(params.data.out_dir)
    )
    return meta if same else None


def run(params: Params, model: str | None = None, out_dir: str | None = None, registered: dict | None = None) -> dict:
    """Build (or keep) the index of ``model`` (default: ``train.out_dir``) in ``out_dir`` (default:
    ``search.out_dir``). ``registered`` is the register stage's result: the index is then logged with that
    version. Returns the index's ``index.json`` with ``built`` (False when an index of this model was kept)."""
    ref = model or params.train.out_dir
    folder = model_folder(ref, params.mlflow.tracking_uri)
    sha = model_sha256(folder)
    out = Path(out_dir or params.search.out_dir)
    meta = _current(out, sha, params)
    built = meta is None
    if built:
        source = ref
        if registered:
            source = f"models:/{registered['model_name']}/{registered['version']}"
        info = {"sha256": sha, "source": source}
        from mpe.model.multi_prompt_clip import MultiPromptCLIP  # torch only when an index is built

        net = MultiPromptCLIP.from_pretrained(folder).eval()
        meta = build_index(net, params.data.out_dir, params.search, out, info)
    if registered:
        meta["logged"] = log_search_index(
            tracking_settings(params.mlflow), out, registered["model_name"], str(registered["version"])
        )
    return {**meta, "built": built, "out_dir": str(out)}
