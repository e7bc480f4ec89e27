"""Nothing machine-specific in DVC-tracked outputs: the same base model prepared under two different
``MPE_HOME`` folders (as on two machines) gives byte-identical ``models/base`` and the same cache key."""

import filecmp
import subprocess
import sys

from mpe.cache.compute import cache_fields
from mpe.cache.store import cache_key
from mpe.config import BaseModelConfig, TextConfig
from mpe.model.base_model import prepare_base_model


def _dvc_md5(path):
    """The md5 DVC computes for a folder output (its own hashing, in a throwaway repo)."""
    code = (
        "import sys; from dvc_data.hashfile.hash import hash_file; from dvc_data.hashfile.meta import Meta\n"
        "from dvc.fs import LocalFileSystem; from dvc_data.hashfile.build import build\n"
        "from dvc_data.hashfile.db import HashFileDB\n"
        "import tempfile; odb = HashFileDB(LocalFileSystem(), tempfile.mkdtemp())\n"
        "_, meta, obj = build(odb, sys.argv[1], LocalFileSystem(), 'md5'); print(obj.hash_info.value)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_base_model_is_byte_identical_under_two_mpe_homes(tmp_path, monkeypatch):
    text = TextConfig(num_prompts=4)
    outs = []
    for home in ("home-a", "elsewhere/home-b"):
        monkeypatch.setenv("MPE_HOME", str(tmp_path / home))
        outs.append(
            prepare_base_model(
                BaseModelConfig(), tmp_path / home / "project" / "models" / "base", apt_tokens=4, apt_init_seed=0
            )
        )
    a, b = outs
    cmp = filecmp.dircmp(a, b)
    assert not cmp.left_only and not cmp.right_only
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    assert not mismatch and not errors, mismatch
    for f in a.iterdir():
        assert str(tmp_path) not in f.read_bytes().decode("latin-1"), f"{f.name} names a machine path"
    assert _dvc_md5(a) == _dvc_md5(b) and _dvc_md5(a).endswith(".dir")
    assert cache_key(cache_fields(a, text, "float16")) == cache_key(cache_fields(b, text, "float16"))
