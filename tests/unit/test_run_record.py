"""Run records: a commit on mpe/runs holding the lock, params, pipeline and metrics, made without touching
the user's branch, index or working tree; none outside git."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from mpe.provenance.run_record import RUNS_BRANCH, read_recorded, record_run, recorded_files


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def _project(root: Path) -> Path:
    root.mkdir()
    (root / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "evaluate": {
                        "cmd": "x",
                        "outs": ["models/trained"],
                        "metrics": [{"metrics/eval.json": {"cache": False}}],
                        "plots": [{"metrics/curve.json": {"cache": False}}, "plots/cached"],
                    }
                }
            }
        )
    )
    (root / "params.yaml").write_text("seed: 0\n")
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (root / "metrics").mkdir()
    (root / "metrics" / "eval.json").write_text('{"r": 1}')
    return root


def test_recorded_files_are_the_pipeline_files_and_the_uncached_outputs(tmp_path):
    assert recorded_files(_project(tmp_path / "p")) == [
        "dvc.yaml",
        "dvc.lock",
        "params.yaml",
        "metrics/eval.json",
        "metrics/curve.json",
    ]


def test_a_run_is_committed_on_its_branch_and_nothing_else_moves(tmp_path):
    proj = _project(tmp_path / "p")
    _git(proj, "init", "-q", "-b", "main")
    (proj / "code.py").write_text("print(1)\n")
    _git(proj, "add", "code.py")
    _git(proj, "commit", "-qm", "code")
    head, status = _git(proj, "rev-parse", "HEAD"), _git(proj, "status", "--porcelain")
    first = record_run(proj, "run-1")
    assert record_run(proj, "run-1 again") == first  # nothing changed: no second commit
    (proj / "dvc.lock").write_text("schema: '2.0'\nstages: {changed: {}}\n")
    second = record_run(proj, "run-2")
    assert _git(proj, "rev-parse", "HEAD") == head and _git(proj, "status", "--porcelain") == status
    assert first["ref"] == RUNS_BRANCH and first["code"] == head
    assert _git(proj, "rev-parse", RUNS_BRANCH) == second["commit"]
    assert _git(proj, "log", "--format=%P", "-1", second["commit"]).split() == [head, first["commit"]]
    assert read_recorded(proj, first["commit"], "dvc.lock") == "schema: '2.0'\nstages: {}\n"
    assert "changed" in read_recorded(proj, second["commit"], "dvc.lock")
    assert read_recorded(proj, first["commit"], "metrics/eval.json") == '{"r": 1}'
    assert read_recorded(proj, first["commit"], "code.py") == "print(1)\n"  # the code it ran with
    assert read_recorded(proj, first["commit"], "metrics/missing.json") is None


def test_outside_git_there_is_no_record(tmp_path):
    assert record_run(_project(tmp_path / "p"), "run") is None


def test_a_project_in_a_folder_of_a_larger_repository_records_its_own_paths(tmp_path):
    repo = tmp_path / "repo"
    (repo / "vision").mkdir(parents=True)
    proj = _project(repo / "vision" / "mpe")
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "commit", "-q", "--allow-empty", "-m", "root")
    rec = record_run(proj, "run")
    assert "vision/mpe/dvc.lock" in _git(repo, "ls-tree", "-r", "--name-only", rec["commit"]).splitlines()
    assert read_recorded(proj, rec["commit"], "params.yaml") == "seed: 0\n"
