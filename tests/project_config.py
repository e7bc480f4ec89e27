"""Params for the small on-disk projects the integration and e2e tests build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml


def small_params(root: Path, base: Path, **overrides) -> dict:
    p = {
        "seed": 0,
        "data": {
            "out_dir": str(root / "data"),
            "image_size": 32,
            "samples_per_shard": 40,
            "shapes": {
                "train_captions": 48,
                "images_per_caption": 2,
                "val_captions": 0,
                "test_captions": 24,
                "negation_queries": 10,
            },
        },
        "base_model": {"name": str(base), "out_dir": str(root / "models" / "base"), "save_dtype": "float32"},
        "model": {
            "embed_dim": 64,
            "text": {"num_prompts": 2, "max_caption_tokens": 32},
            "vision": {
                "image_size": 32,
                "patch_size": 8,
                "hidden_size": 64,
                "num_layers": 2,
                "num_heads": 2,
                "intermediate_size": 128,
            },
        },
        "cache": {"root": str(root / "cache"), "batch_size": 8},
        "train": {
            "storage_path": str(root / "ray_results"),
            "out_dir": str(root / "models" / "trained"),
            "batch_size": 16,
            "max_steps": 6,
            "checkpoint_every": 2,
            "log_every": 1,
            "save_dtype": "float32",
        },
        "metrics_dir": str(root / "metrics"),
        "evaluate": {"plots_dir": str(root / "plots")},
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlruns.db'}", "artifact_root": str(root / "mlartifacts")},
    }
    for section, values in overrides.items():
        p[section] = {**p.get(section, {}), **values} if isinstance(values, dict) else values
    return p


# The params the session project was built with: tests that retrain the session project rewrite its
# params.yaml, so copies start from this file.
PRISTINE_PARAMS = "params.session.yaml"


def write_params(root: Path, data: dict) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def has_intact_checkpoint(ray_results: Path) -> bool:
    """Whether some run under ``ray_results`` holds a checkpoint that reads back whole (a test that kills
    the run as soon as a checkpoint folder appears would otherwise race its writing)."""
    from mpe.training.checkpoint import newest_intact

    return ray_results.is_dir() and any(newest_intact(d) for d in ray_results.glob("*") if d.is_dir())


def copy_project(project, tmp: Path, **sections) -> Path:
    """A copy of the session project's data, base model and cache under ``tmp``, with its params file (training
    on one Ray Train worker, decoding in it, unless ``train`` says otherwise). What
    training wrote into the session project (another test's model under ``models/trained``) is not copied:
    a copy starts untrained, with the session's params, whichever tests ran before it in the same worker."""
    root, _ = project
    for d in ("data", "models/base", "cache"):
        if (root / d).exists():
            shutil.copytree(root / d, tmp / d, symlinks=True)
    p = yaml.safe_load((root / PRISTINE_PARAMS).read_text())
    p["data"]["out_dir"] = str(tmp / "data")
    p["base_model"]["out_dir"] = str(tmp / "models" / "base")
    p["cache"]["root"] = str(tmp / "cache")
    # One Ray Train worker that decodes its batches itself: a copy is for faults of files, lineage and processes,
    # which neither ranks nor decode processes change, and each costs ~2-6 CPU-seconds a training (a process that
    # imports torch again). The tests of what ranks do (tests/integration/test_train_and_evaluate.py, the
    # precision every rank trains in, the two-node cluster) ask for two; the default's decode processes are
    # trained with there and in the whole-flow tests, and read in tests/integration/test_train_stream.py.
    p["train"].update(
        storage_path=str(tmp / "ray_results"),
        out_dir=str(tmp / "models" / "trained"),
        fail_at_step=None,
        max_steps=6,
        run_name="mpe-default",
        log_sample_keys=False,
        num_workers=1,
        loader_workers=0,
    )
    p["metrics_dir"] = str(tmp / "metrics")
    p["evaluate"].update(plots_dir=str(tmp / "plots"))
    p["mlflow"] = {"tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}", "artifact_root": str(tmp / "mlartifacts")}
    for section, values in sections.items():
        p[section] = {**p.get(section, {}), **values}
    (tmp / "params.yaml").write_text(yaml.safe_dump(p))
    return tmp / "params.yaml"


def local_cluster_dir(project_dir: Path) -> str:
    """The folder of the local Ray cluster that an ``mpe`` command run in ``project_dir`` starts."""
    from mpe.runtime.ray_cluster import local_temp_dir

    cwd = os.getcwd()
    os.chdir(project_dir)
    try:
        return local_temp_dir()
    finally:
        os.chdir(cwd)


def write_tiny_siglip(folder: Path, seed: int = 0) -> Path:
    """A tiny random vision-only SigLIP checkpoint (32 px, patch 8, width 32) with its processor config:
    what ``model.vision.pretrained`` names."""
    import torch
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    vit = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    )
    vit.save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def replace_weights_in_place(folder: Path, seed: int) -> None:
    """Every safetensors file of a model folder rewritten with other values of the same names, shapes and
    dtypes, at the same path: a new download of "the same" checkpoint."""
    import torch
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(seed)
    for f in sorted(folder.glob("*.safetensors")):
        state = load_file(str(f))
        other = {
            k: (torch.randn(v.shape, generator=gen).to(v.dtype) if v.is_floating_point() else v)
            for k, v in state.items()
        }
        save_file(other, str(f), metadata={"format": "pt"})


def run_mpe(params: Path, *args, timeout=600) -> subprocess.CompletedProcess:
    """``mpe --params <params> <args>`` run in the params file's folder, as a user runs it."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "mpe"), "--params", str(params), *args],
        cwd=params.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# Ray Train's controller logs this warning, with its traceback, when a call to its autoscaling coordinator times
# out (5 s) on an overloaded machine, as a test suite on two cores makes it; Ray's own message says it is safe to
# ignore, and training goes on.
RAY_TRANSIENT_WARNING = "it's safe to ignore this error"


def unexpected_tracebacks(text: str) -> list[str]:
    """Each traceback in ``text`` (as the 300 characters before it) but those of Ray's transient warning."""
    parts = text.split("Traceback (most recent call last):")
    return [p[-300:] for p in parts[:-1] if RAY_TRANSIENT_WARNING not in p[-400:]]


def assert_one_line_error(run: subprocess.CompletedProcess, *needles: str, single_line: bool = False) -> str:
    """The command failed as a user error (exit 2, no traceback) whose message holds every needle; with
    ``single_line``, exactly one line of its stderr is mpe's message. Returns the stderr."""
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    if single_line:
        lines = [line for line in run.stderr.splitlines() if line.startswith("mpe ")]
        assert len(lines) == 1, run.stderr[-3000:]
    for n in needles:
        assert n in run.stderr, (n, run.stderr[-3000:])
    return run.stderr
