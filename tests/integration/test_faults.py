"""Faults a user will hit, injected for real — truncated shards, checkpoints and weights, immutable
folders, a full filesystem, a killed training driver — each answered by a one-line error naming the
file (exit 2) or by an exact resume, and nothing already done is lost."""

import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mpe.cli import main
from mpe.config import load_params
from mpe.files.hashing import file_sha256
from mpe.files.verified import RECORD
from tests.project_config import (
    assert_one_line_error,
    copy_project,
    has_intact_checkpoint,
    local_cluster_dir,
    run_mpe,
    unexpected_tracebacks,
)

BIN = Path(sys.executable).parent


def test_a_truncated_shard_is_named_skipped_on_request_and_repaired_keeping_the_training_run(project, tmp_path):
    """Cache and train name a truncated shard; the cache skips it on request; the data stage downloads it again,
    and the repair restores the same data: the training run's identity (its fingerprint) does not change, so the
    rerun resumes the finished run and writes the same model, not a new one."""
    from mpe.stages import data

    params = copy_project(project, tmp_path, train={"max_steps": 2, "checkpoint_every": 2})
    data.run(load_params(params))  # the copy's own download (its URL lists name the copy's images)
    assert run_mpe(params, "cache").returncode == 0
    first = run_mpe(params, "train")
    assert first.returncode == 0, first.stderr[-3000:]
    before = json.loads((tmp_path / "metrics" / "train.json").read_text())
    model = {p.name: file_sha256(p) for p in (tmp_path / "models" / "trained").rglob("*") if p.is_file()}
    shard = sorted((tmp_path / "data" / "shards" / "train").glob("*.tar"))[1]
    original = file_sha256(shard)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    assert_one_line_error(run_mpe(params, "cache"), shard.name, "mpe data")
    assert_one_line_error(run_mpe(params, "train"), shard.name, "mpe data")
    skipping = copy_project(project, tmp_path / "skip", data={"skip_corrupt_shards": True})
    bad = tmp_path / "skip" / "data" / "shards" / "train" / shard.name
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size // 2)
    assert run_mpe(skipping, "cache").returncode == 0
    summary = json.loads((tmp_path / "skip" / "metrics" / "cache.json").read_text())
    assert summary["skipped_corrupt_shards"] == [shard.name]
    stats = data.run(load_params(params))  # the data stage downloads the shard again
    assert stats["repaired_shards"] == {"train": [shard.name]} and file_sha256(shard) == original
    again = run_mpe(params, "train")
    assert again.returncode == 0, again.stderr[-3000:]
    after = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert after["ray_run_name"] == before["ray_run_name"]
    assert after["restored_from_step"] == after["steps"] == 2  # the finished run, resumed: nothing retrained
    assert {p.name: file_sha256(p) for p in (tmp_path / "models" / "trained").rglob("*") if p.is_file()} == model


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(project, tmp_path):
    train = {"max_steps": 6, "checkpoint_every": 2, "keep_checkpoints": 2, "fail_at_step": 5, "max_failures": 0}
    params = copy_project(project, tmp_path, train=train)
    assert run_mpe(params, "train").returncode == 2  # a worker fails after step 5, with no restart left
    run_dir = next((tmp_path / "ray_results").glob("mpe-default-*"))
    newest = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())[-1]
    weights = newest / "trainable.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 3)
    run = run_mpe(params, "train")  # the failure is injected once: this run goes through
    assert run.returncode == 0, run.stderr[-3000:]
    assert "trainable.safetensors: does not match the sha256" in run.stdout + run.stderr
    summary = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert summary["restored_from_step"] == 2 and summary["steps"] == 6


def test_missing_inputs_and_damaged_models_are_one_line_errors(project, tmp_path, tiny_base_dir):
    params = copy_project(project, tmp_path)
    shutil.rmtree(tmp_path / "cache")
    assert_one_line_error(run_mpe(params, "train"), "run `mpe cache` first")
    model = tmp_path / "model"
    assert main(["model", "init", "--base", str(tiny_base_dir), "--out", str(model), "--num-prompts", "2"]) == 0
    text = tmp_path / "t.txt"
    text.write_text("a red circle\n")
    weights = model / "mpe_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert_one_line_error(
        run_mpe(params, "embed", "--model", str(model), "--text-file", str(text), "--out", str(tmp_path / "t.npy")),
        str(weights),
    )
    (model / "mpe_config.json").write_text("{ not json")
    assert_one_line_error(
        run_mpe(params, "embed", "--model", str(model), "--text-file", str(text), "--out", str(tmp_path / "t.npy")),
        "mpe_config.json",
    )
    debug = run_mpe(
        params, "--debug", "embed", "--model", str(model), "--text-file", str(text), "--out", str(tmp_path / "t.npy")
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr  # --debug shows it
    (tmp_path / "latin1.txt").write_bytes("a caf\xe9 au lait\n".encode("latin-1"))
    assert_one_line_error(
        run_mpe(
            params,
            "embed",
            "--model",
            str(model),
            "--text-file",
            str(tmp_path / "latin1.txt"),
            "--out",
            str(tmp_path / "l.npy"),
        ),
        "latin1.txt: line 1 is not UTF-8",
    )


def test_a_model_config_edited_to_another_shape_is_one_line_naming_both_files(tmp_path, tiny_base_dir):
    model = tmp_path / "model"
    assert main(["model", "init", "--base", str(tiny_base_dir), "--out", str(model), "--num-prompts", "2"]) == 0
    config = model / "mpe_config.json"
    meta = json.loads(config.read_text())
    meta["model"]["embed_dim"] *= 2  # valid on its own, but not the shape the weights were saved with
    config.write_text(json.dumps(meta))
    (tmp_path / "t.txt").write_text("a red circle\n")
    run = subprocess.run(
        [str(BIN / "mpe"), "embed", "--model", str(model), "--text-file", "t.txt", "--out", "t.npy"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert_one_line_error(
        run, f"{model / 'mpe_weights.safetensors'}: does not fit {config}", "size mismatch", "embed_dim"
    )


def test_a_damaged_or_missing_text_checkpoint_in_a_model_folder_is_one_line_naming_it(tmp_path, tiny_base_dir, capsys):
    """transformers reads a missing folder as a hub id (and went online, ending in a traceback), and a
    damaged tokenizer or config file as a JSONDecodeError or TypeError traceback."""
    model = tmp_path / "model"
    assert main(["model", "init", "--base", str(tiny_base_dir), "--out", str(model), "--num-prompts", "2"]) == 0
    (tmp_path / "t.txt").write_text("a red circle\n")
    embed = ["embed", "--model", str(model), "--text-file", str(tmp_path / "t.txt"), "--out", str(tmp_path / "t.npy")]
    text_dir = model / "text_model"
    for damage, phrase in (
        (lambda: (text_dir / "tokenizer.json").write_text("{"), "not a loadable checkpoint (JSONDecodeError"),
        (lambda: (text_dir / "config.json").write_text("[]"), "not a loadable checkpoint (TypeError"),
        (lambda: shutil.rmtree(text_dir), "not a transformers checkpoint folder (the folder is missing)"),
    ):
        shutil.copytree(text_dir, tmp_path / "kept", dirs_exist_ok=True)
        damage()
        capsys.readouterr()
        assert main(embed) == 2
        err = capsys.readouterr().err
        assert f"{text_dir}: {phrase}" in err and "Traceback" not in err and len(err.splitlines()) == 1, err
        shutil.rmtree(text_dir, ignore_errors=True)
        shutil.copytree(tmp_path / "kept", text_dir)


def test_an_image_too_elongated_to_embed_is_refused_by_name_before_it_is_decoded(tmp_path, tiny_base_dir):
    """A 1×16,777,216 PNG (16 kB, within 4096² pixels) is resized to 32×536,870,912 before its centre is cut
    out: `mpe embed` used to end in a MemoryError traceback; now its header refuses it, naming the file."""
    from PIL import Image

    model = tmp_path / "model"
    assert main(["model", "init", "--base", str(tiny_base_dir), "--out", str(model), "--num-prompts", "2"]) == 0
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(images / "a.png")
    Image.new("L", (1, 4096 * 4096)).save(images / "strip.png")
    run = subprocess.run(
        [str(BIN / "mpe"), "embed", "--model", str(model), "--image-dir", "images", "--out", "i.npy"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert_one_line_error(run, "images/strip.png is 1×16777216 pixels, too elongated", "crop it")
    assert not (tmp_path / "i.npy").exists()


def _immutable(folder: Path) -> bool:
    return subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0


def test_an_unwritable_folder_is_named_not_a_temp_file(project, tmp_path, tiny_base_dir):
    locked = tmp_path / "locked"
    locked.mkdir()
    if not _immutable(locked):
        pytest.skip("chattr +i is not permitted here")
    try:
        params = copy_project(project, tmp_path)
        run = run_mpe(params, "model", "init", "--base", str(tiny_base_dir), "--out", str(locked / "m"))
        assert_one_line_error(run, f"{locked / 'm'}: permission denied")
        run = run_mpe(params, "compare", "--out", str(locked / "compare.md"))
        assert_one_line_error(run, f"{locked / 'compare.md'}: permission denied")
        assert list(locked.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(locked)])


def test_a_full_disk_stops_the_cache_with_its_name_and_keeps_finished_shards(project, tmp_path, monkeypatch):
    params = copy_project(project, tmp_path)
    shutil.rmtree(tmp_path / "cache")
    full = tmp_path / "cache"
    full.mkdir()
    mounted = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(full)], capture_output=True).returncode
        == 0
    )
    try:
        if not mounted:  # no mount here: the same error, raised where the write happens
            from mpe.cache import store as cache_store

            real, calls = cache_store.ShardWriter.write_caption, {"n": 0}

            def write_caption(self, u, rows):
                calls["n"] += 1
                if calls["n"] > 60:
                    raise OSError(errno.ENOSPC, "No space left on device", str(full / "x"))
                return real(self, u, rows)

            monkeypatch.setattr(cache_store.ShardWriter, "write_caption", write_caption)
            code = main(["--params", str(params), "cache"])
            assert code == 2
        else:
            assert_one_line_error(run_mpe(params, "cache"), "no space left on the device", "finished work is kept")
        finished = [p for p in full.rglob("train/*.safetensors") if not p.name.startswith(".")]
        assert finished, "the shards written before the disk filled are kept"
        assert not [p for p in full.rglob("*") if p.name.startswith(".") and p.is_file() and p.name != RECORD]
    finally:
        if mounted:
            subprocess.run(["umount", str(full)])


def test_a_failed_url_list_run_never_leaves_a_mix_in_use(project, tmp_path):
    import pandas as pd

    from mpe.config import DataConfig
    from mpe.data.prepare import prepare_data
    from mpe.data.stats import read_stats
    from mpe.errors import DataError, StageInputError

    params = copy_project(project, tmp_path)
    data = tmp_path / "data"
    assert (data / "shards" / "negation").exists()
    urls = tmp_path / "list.parquet"
    pd.DataFrame({"URL": [f"/no/scheme-{i}.png" for i in range(8)], "TEXT": ["a caption"] * 8}).to_parquet(urls)
    cfg = DataConfig(source="url_list", url_list=str(urls), out_dir=str(data), image_size=32)
    with pytest.raises(DataError):
        prepare_data(cfg, 0)
    with pytest.raises(StageInputError, match="run `mpe data` first"):
        read_stats(data)  # nothing reads a half-replaced data folder
    assert not (data / "shards" / "negation").exists()
    assert_one_line_error(run_mpe(params, "cache"), "run `mpe data` first")


def test_written_files_get_the_modes_of_the_umask(tmp_path):
    from mpe.files.atomic import atomic_dir, write_text
    from mpe.files.storage import atomic_local_copy

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.json", "{}")
        with atomic_dir(tmp_path / "folder") as d:
            (d / "inner.txt").write_text("x")
        with atomic_local_copy(tmp_path / "shard.safetensors", ".safetensors") as t:
            t.write_bytes(b"x")
    finally:
        os.umask(old)
    for f in (tmp_path / "a.json", tmp_path / "folder" / "inner.txt", tmp_path / "shard.safetensors"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755


def _ray_processes(temp_dir: str) -> list[int]:
    from mpe.runtime.ray_cluster import _processes

    return [pid for pid, (_, marked) in _processes(temp_dir).items() if marked]


def _actors_started(temp_dir: str) -> set[str]:
    """The classes of the actors every session of the local cluster in ``temp_dir`` started (Ray's worker logs
    open with the actor's name)."""
    names = set()
    for log in Path(temp_dir).glob("session_*/logs/worker-*.out"):
        names.update(re.findall(r":actor_name:(\w+)", log.read_text(errors="replace")))
    return names


def test_a_killed_training_driver_leaves_nothing_running_and_the_rerun_resumes(project, tmp_path):
    params = copy_project(project, tmp_path, train={"max_steps": 12, "checkpoint_every": 2, "log_sample_keys": True})
    proc = subprocess.Popen(
        [str(BIN / "mpe"), "--params", str(params), "train"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not has_intact_checkpoint(tmp_path / "ray_results"):
            time.sleep(0.2)
        assert has_intact_checkpoint(tmp_path / "ray_results"), "no intact checkpoint before the deadline"
        proc.send_signal(signal.SIGKILL)  # the driver alone, as `kill -9 <pid>` does
    finally:
        proc.wait()
    temp_dir = local_cluster_dir(tmp_path)
    time.sleep(1)
    assert _ray_processes(temp_dir), "some of the killed driver's local cluster is left (what the rerun stops)"
    run = run_mpe(params, "train")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert summary["steps"] == 12 and summary["restored_from_step"] >= 2
    time.sleep(2)
    assert _ray_processes(temp_dir) == []  # the orphans were stopped, and the rerun's cluster ended with it
    actors = _actors_started(temp_dir)
    assert {"TrainController", "RayTrainWorker"} <= actors, actors
    assert "PreemptionWatcher" not in actors  # Ray Train's drain watcher: a local cluster's node is never drained


def test_another_ray_cluster_on_the_machine_is_left_alone_and_does_not_disturb_training(project, tmp_path):
    """A Ray cluster someone else started on this machine (`ray start --head`): `mpe train` starts and ends
    its own local cluster beside it, with no error or traceback, and the other cluster keeps running."""
    from mpe.runtime.loopback import free_port
    from tests.session_temp import _processes_naming

    foreign = Path(tempfile.mkdtemp(prefix="rf-", dir=os.environ.get("MPE_TEST_TMPDIR")))  # short: socket paths
    ray = str(BIN / "ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = [ray, "start", "--head", "--port", str(free_port()), "--num-cpus", "1", "--include-dashboard", "false"]
    out = subprocess.run(
        [*start, "--temp-dir", str(foreign), "--node-ip-address", "127.0.0.1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        theirs = _processes_naming(foreign)
        assert theirs
        params = copy_project(project, tmp_path, train={"max_steps": 2, "checkpoint_every": 2})
        run = run_mpe(params, "train")
        assert run.returncode == 0, run.stderr[-3000:]
        assert "Found multiple active Ray instances" not in run.stdout + run.stderr
        assert not unexpected_tracebacks(run.stdout + run.stderr), (run.stdout + run.stderr)[-3000:]
        assert json.loads((tmp_path / "metrics" / "train.json").read_text())["steps"] == 2
        assert set(theirs) <= set(_processes_naming(foreign))  # the other cluster was not touched
    finally:
        for pid in _processes_naming(foreign):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
