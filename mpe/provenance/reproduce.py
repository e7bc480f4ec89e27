"""``mpe reproduce``: bring back a registered version's outputs in any clone that reaches the DVC remote
and the tracking store — its ``dvc.lock``, ``params.yaml`` and ``dvc.yaml`` from the run's commit on
``mpe/runs`` (or, without git, from the training run's MLflow artifacts), then ``dvc pull`` of its data,
cache, base model and trained model (or the model alone), checked against the hashes it was registered
with."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from mpe.errors import MpeError
from mpe.files.atomic import write_text
from mpe.provenance.dvc import DvcError, changed_outputs, pull, remote_of
from mpe.provenance.run_record import RECORDED, is_git_repository, read_recorded, recorded_files
from mpe.tracking.runs import use
from mpe.tracking.settings import TrackingSettings


class ReproduceError(MpeError):
    """A version's outputs cannot be brought back; the message names the version, the path and the remote."""


def _version(client, name: str, version: str | None, alias: str | None):
    import mlflow

    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException:
        which = f"@{alias}" if alias else f"version {version}"
        raise ReproduceError(f"model '{name}' has no {which} in the tracking store") from None


def _recorded_files(project: Path, client, mv) -> tuple[dict[str, str], str]:
    """The version's lock, params and pipeline files, and where they came from."""
    commit = mv.tags.get("mpe.run_commit")
    files = {}
    if commit and is_git_repository(project):
        names = RECORDED
        if (pipeline := read_recorded(project, commit, "dvc.yaml")) is not None:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:  # the record's own pipeline says what it holds
                (Path(tmp) / "dvc.yaml").write_text(pipeline)
                names = recorded_files(Path(tmp))
        files = {n: t for n in names if (t := read_recorded(project, commit, n)) is not None}
        if "dvc.lock" in files:
            return files, f"commit {commit[:12]} on {mv.tags.get('mpe.run_ref') or 'mpe/runs'}"
    run_id = mv.tags.get("mlflow_train_run_id") or mv.run_id
    if run_id:
        import mlflow

        try:
            local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="lineage"))
        except Exception:  # nothing logged (a version registered before runs were recorded)
            local = None
        if local is not None and local.is_dir():
            files.update(
                {p.relative_to(local).as_posix(): p.read_text() for p in sorted(local.rglob("*")) if p.is_file()}
            )
        if "dvc.lock" in files:
            return files, f"the MLflow artifacts of run {run_id}"
    raise ReproduceError(
        f"model '{mv.name}' version {mv.version} carries no lineage: no run commit "
        f"({commit or 'no mpe.run_commit tag'}) in this repository and no dvc.lock among its "
        f"training run's artifacts; it was registered before runs were recorded"
    )


def _missing(text: str) -> list[str]:
    """The output paths a failed ``dvc pull`` names as missing from the remote."""
    found = re.findall(r"name:\s*(\S+?),\s*md5", text) + re.findall(
        r"Checkout failed for following targets:\s*(.*)", text
    )
    return [f.strip() for f in found if f.strip()]


def _missing_objects(text: str) -> list[tuple[str, str]]:
    """``(md5, where in the remote)`` of each object a failed ``dvc pull`` could not fetch."""
    return re.findall(r"failed to transfer '([0-9a-f]{32}(?:\.dir)?)' - \[Errno \d+\] [^:']+: '([^']+)'", text)


def _object_names(project: Path, lock: dict, remote_url: str | None) -> dict[str, str]:
    """The workspace path of every object of the lock's outputs, by md5: a file output's own, and each file
    of a folder output as its ``.dir`` listing (read from DVC's cache or a local remote) names it."""
    roots = [project / ".dvc" / "cache" / "files" / "md5"] + (
        [Path(remote_url) / "files" / "md5"] if remote_url else []
    )
    names = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            md5, path = out.get("md5") or "", out.get("path")
            names[md5] = path
            if not md5.endswith(".dir"):
                continue
            for root in roots:
                listing = root / md5[:2] / md5[2:]
                if listing.is_file():
                    try:
                        names.update({e["md5"]: f"{path}/{e['relpath']}" for e in json.loads(listing.read_text())})
                    except (ValueError, KeyError, TypeError):
                        continue
                    break
    return names


def reproduce(
    project: Path,
    settings: TrackingSettings,
    name: str,
    version: str | None = None,
    alias: str | None = None,
    only_model: bool = False,
    log=print,
) -> dict:
    """Restore ``name`` (``version`` or ``alias``) in ``project``; returns what was restored."""
    project = Path(project)
    client = use(settings)
    mv = _version(client, name, version, alias)
    files, source = _recorded_files(project, client, mv)
    root = project.resolve()
    for n, text in files.items():
        target = (project / n).resolve()
        if root not in target.parents:  # a record names project-relative files only
            raise ReproduceError(f"model '{name}' version {mv.version}: its record names {n!r}, outside {project}")
        write_text(target, text)
    params = yaml.safe_load(files["params.yaml"]) if "params.yaml" in files else {}
    model_dir = (params.get("train") or {}).get("out_dir", "models/trained")
    remote = (params.get("dvc") or {}).get("remote")
    targets = [model_dir] if only_model else []
    lock = yaml.safe_load(files["dvc.lock"])
    try:
        pull(project, targets, remote, log)
    except DvcError as err:
        remote_name, url = remote_of(project, remote)
        where = f"'{remote_name}' ({url})" if remote_name else "(none configured)"
        objects = _missing_objects(err.output)
        if objects:
            local = url if url and "://" not in url else None
            names = _object_names(project, lock, local)
            missing = [f"{names.get(md5, 'an object')} (md5 {md5[:12]}…, {place})" for md5, place in objects]
        else:
            missing = _missing(err.output) or [model_dir if only_model else "the outputs of dvc.lock"]
        raise ReproduceError(
            f"model '{name}' version {mv.version}: the DVC remote {where} lacks {len(missing)} object(s): "
            f"{'; '.join(missing[:3])}; push them from a machine that has them "
            f"(`dvc push{' -r ' + remote_name if remote_name else ''}`)"
        ) from None
    outs = {o["path"]: o.get("md5") for st in (lock.get("stages") or {}).values() for o in st.get("outs") or []}
    want = mv.tags.get("dvc.model")
    if want and outs.get(model_dir) != want:
        raise ReproduceError(
            f"model '{name}' version {mv.version}: the recorded lock says {model_dir} is "
            f"{outs.get(model_dir)}, the registry says {want}"
        )
    changed = changed_outputs(project, targets)
    if changed:
        raise ReproduceError(
            f"model '{name}' version {mv.version}: after the pull these outputs differ from the "
            f"recorded lock: {', '.join(changed[:5])}"
        )
    return {
        "model_name": name,
        "version": str(mv.version),
        "source": source,
        "restored": sorted(files),
        "pulled": targets or sorted(set(outs) - set(files)),
        "model_md5": outs.get(model_dir),
        "code_commit": mv.tags.get("git_commit"),
    }
