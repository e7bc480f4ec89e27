"""Guards on the installed environment that the pipeline depends on."""

import importlib.util
import sys
from pathlib import Path


def test_dataclasses_backport_is_not_installed():
    """img2dataset pulls in the `dataclasses` 0.6 backport; its dataclasses.py in site-packages
    breaks pydantic-settings and so Prefect's local server ('unexpected keyword slots').
    `make install` removes it; this fails if it comes back."""
    spec = importlib.util.find_spec("dataclasses")
    assert spec is not None and "site-packages" not in str(spec.origin), spec.origin
    site = [Path(p) for p in sys.path if p.endswith("site-packages")]
    assert not any((p / "dataclasses.py").exists() for p in site)


def test_pipeline_libraries_import():
    for mod in ("img2dataset", "webdataset", "ray.train", "mlflow", "dvc", "prefect"):
        assert importlib.util.find_spec(mod) is not None, mod
