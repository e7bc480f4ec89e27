"""Storage that refuses a stage's writes, injected for real with small tmpfs mounts under the test's own
folder (a full disk, a read-only folder, a volume mounted where an output folder goes): each is one line
naming the path and what to do (exit 2), found before work that could not be put in place, and nothing
already written is lost or left half-written."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.project_config import assert_one_line_error, copy_project, run_mpe

BIN = Path(sys.executable).parent


@contextlib.contextmanager
def _tmpfs(where: Path, *options: str):
    """A tmpfs mounted at ``where`` (created) with ``options`` (size=..., ro); unmounted however the test ends."""
    where.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options or ("size=1m",)), "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_full_disk_at_export_names_the_model_folder_and_leaves_no_temporary_folder(project, tmp_path, tiny_base_dir):
    params = copy_project(project, tmp_path)
    with _tmpfs(tmp_path / "small", "size=2m") as small:
        run = run_mpe(params, "model", "init", "--base", str(tiny_base_dir), "--out", str(small / "m"))
        assert_one_line_error(run, f"{small / 'm'}: no space left on the device", single_line=True)
        assert list(small.iterdir()) == []  # the half-written temporary folder is gone


def test_a_volume_mounted_at_the_model_folder_is_refused_before_training(project, tmp_path):
    params = copy_project(project, tmp_path)
    with _tmpfs(tmp_path / "models" / "trained", "size=64m") as mounted:
        (mounted / "keep.txt").write_text("a file the user keeps on the volume")
        line = assert_one_line_error(
            run_mpe(params, "train"), str(mounted), "train.out_dir", "a mount point", "one level up", single_line=True
        )
        assert "keep.txt" in {p.name for p in mounted.iterdir()}
    assert not (tmp_path / "ray_results").exists(), f"training started before the refusal: {line}"


def test_a_read_only_metrics_folder_is_one_line_and_refused_before_training(project, tmp_path):
    params = copy_project(project, tmp_path)
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "data.json").write_text(json.dumps({"kept": True}))  # under the mount: untouched
    with _tmpfs(metrics, "size=1m", "ro") as ro:
        assert_one_line_error(
            run_mpe(params, "sources"), f"{ro / 'sources.json'}: read-only file system", single_line=True
        )
        assert_one_line_error(run_mpe(params, "train"), "metrics_dir", "read-only file system", single_line=True)
    assert not (tmp_path / "ray_results").exists()
    assert json.loads((metrics / "data.json").read_text()) == {"kept": True}


def test_dvc_failure_line_names_the_full_or_read_only_folder_in_one_line(tmp_path, tiny_base_dir):
    """`mpe run` runs each stage through `dvc repro`; a stage that fails on storage ends the run with one line:
    the stage's own error (or the OS error DVC hit, with its path), not DVC's tail ending in a traceback."""
    from mpe.provenance.dvc import DvcError, repro_stage
    from tests.e2e.project import make_project, pipeline_params

    proj, _ = make_project(tmp_path / "proj", pipeline_params(tiny_base_dir))
    metrics = proj / "metrics"
    with _tmpfs(metrics, "size=64k") as full:
        with open(full / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:  # the disk is full before the stage writes
                f.write(b"\0" * 4096)
        with pytest.raises(DvcError) as err:
            repro_stage("sources", proj, log=lambda line: None)
        message = str(err.value)
        assert "\n" not in message and "Traceback" not in message, message
        assert "`dvc repro --single-item sources` failed" in message
        assert "mpe sources: error:" in message and "sources.json: no space left on the device" in message, message
    with _tmpfs(metrics, "size=64k", "ro"):
        with pytest.raises(DvcError) as err:
            repro_stage("sources", proj, log=lambda line: None)
        message = str(err.value)
        assert "\n" not in message and "read-only file system" in message and "sources.json" in message, message


def test_outputs_dvc_could_not_cache_stop_the_run_instead_of_being_registered_unpushed(tmp_path, tiny_base_dir):
    """DVC reports a full cache disk as `ERROR: failed to transfer …` yet exits 0 and writes dvc.lock, and its
    push then skips the missing files with a warning (exit 0): the run went on to record and register
    outputs the remote never got. Both are now errors that say how to repair the cache."""
    from mpe.provenance.dvc import DvcError, push, repro_stage
    from tests.e2e.project import make_project, pipeline_params

    proj, _ = make_project(tmp_path / "proj", pipeline_params(tiny_base_dir))
    repro_stage("sources", proj, log=lambda line: None)  # base_model's deps: the base LLM's hash
    with _tmpfs(proj / ".dvc" / "cache", "size=1m"):
        with pytest.raises(DvcError) as err:
            repro_stage("base_model", proj, log=lambda line: None)
    message = str(err.value)
    assert "\n" not in message and "exited 0 but could not copy its outputs into DVC's cache" in message, message
    assert "no space left on device" in message and "dvc commit --force base_model" in message, message
    assert (proj / "models" / "base" / "model.safetensors").is_file()  # the stage's work is kept
    with pytest.raises(DvcError, match="left out outputs that DVC's cache lacks"):
        push(proj, log=lambda line: None)
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "dvc"), "commit", "--force", "base_model"], cwd=proj, check=True, capture_output=True)
    push(proj, log=lambda line: None)  # the repaired cache pushes whole
