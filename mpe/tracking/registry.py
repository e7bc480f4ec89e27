"""The MLflow model registry: register a logged model with lineage tags, and set ``@champion`` only if
it beats the current champion by the margin on the same test set; otherwise ``@challenger``, with the
reason. A champion measured on another test set (its ``test_set_sha256`` differs) is re-measured on this
one; where it cannot be, the new version is not promoted.

Registrations may run at once (two flows against one tracking server): the gate's read-decide-set is
serialised by the registry itself. Each version is created with all its tags, ``gate.state=pending`` and
``gate.owner`` (the registering process) among them, in the call that gives it its number, and gates only
once every lower pending version has decided, so the decisions are those of registering one after the
other, in version order, on any backend and from any machine. A model is registered once: a second
registration of the same trained model (its DVC hash) names the first version, and finishes its gate if
the process that created it died first."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable

from mpe.config import RegisterConfig
from mpe.records import mlflow_key
from mpe.runtime.lifeline import alive, token_of
from mpe.tracking.gate import decide, gate_score, is_benchmark_metric
from mpe.tracking.runs import use
from mpe.tracking.settings import TrackingSettings

log = logging.getLogger(__name__)
GATE_STATE = "gate.state"  # pending -> decided | failed | abandoned (by a later registration that gave up waiting)
GATE_OWNER = "gate.owner"  # <host>:<pid>.<start time> of the process that gates the version
RESUMABLE = ("abandoned", "failed")  # gate states a later registration of the same model decides again


def _me() -> str:
    return f"{socket.gethostname()}:{token_of(os.getpid())}"


def owner_dead(owner: str | None) -> bool:
    """Whether the process named by a version's ``gate.owner`` is known to be gone: it ran on this machine
    and is no longer alive. (One on another machine is waited for, up to ``register.gate_wait_s``.)"""
    host, _, token = (owner or "").rpartition(":")
    return bool(token) and host == socket.gethostname() and not alive(token)


def register_and_gate(
    settings: TrackingSettings,
    cfg: RegisterConfig,
    model_uri: str,
    new_metrics: dict,
    lineage: dict,
    evaluate_champion: Callable[[str], dict] | None = None,
) -> dict:
    """Register ``model_uri`` under ``cfg.model_name``, tag it, and set ``@champion`` or ``@challenger``.
    ``evaluate_champion(model_uri) -> metrics`` re-measures a champion evaluated on another test set.

    A model already registered (the same DVC hash of the trained model, ``lineage["dvc.model"]``) is not
    registered again: the result names its version. If the process that registered it died before its gate
    decided, this one decides it. Two registrations of one model at once both create a version, see each
    other, and the higher one withdraws its own."""
    import mlflow

    client = use(settings)
    score = gate_score(new_metrics, cfg.gate_metric)  # a gate metric that names no metric fails before registering
    same = _already_registered(client, cfg.model_name, lineage.get("dvc.model"))
    if same is not None:
        return _registered_before(client, cfg, same, score, lineage, evaluate_champion)
    tags = {k: "" if v is None else str(v) for k, v in lineage.items()}
    tags.update(
        {
            gate_tag(cfg.gate_metric): f"{score:.6f}",
            "eval.metrics": json.dumps(new_metrics)[:4900],
            GATE_OWNER: _me(),
            GATE_STATE: "pending",
        }
    )
    # every tag in the call that creates the version: a registration killed at any point leaves a version
    # that says which model it is, who gates it, and that its gate is pending
    version = mlflow.register_model(model_uri, cfg.model_name, tags=tags)
    first = _already_registered(client, cfg.model_name, lineage.get("dvc.model"))
    if first is not None and int(first.version) < int(version.version):  # registered at the same moment
        log.warning(
            "%s: this model was registered at the same time as version %s; version %s withdrawn",
            cfg.model_name,
            first.version,
            version.version,
        )
        client.delete_model_version(cfg.model_name, version.version)
        return _registered_before(client, cfg, first, score, lineage, evaluate_champion)
    return _decide(client, cfg, str(version.version), score, lineage, evaluate_champion)


def _decide(client, cfg: RegisterConfig, version: str, score: float, lineage: dict, evaluate_champion) -> dict:
    """Wait for the lower versions' gates, then gate ``version``; its state says how that ended."""
    state = "failed"
    try:
        wait_for_turn(client, cfg.model_name, int(version), cfg.gate_wait_s)
        result = _gate(client, cfg, version, score, lineage, evaluate_champion)
        state = "decided"
        return result
    finally:  # last: a later registration waiting on this one goes on
        client.set_model_version_tag(cfg.model_name, version, GATE_STATE, state)


def _registered_before(client, cfg: RegisterConfig, same, score: float, lineage: dict, evaluate_champion) -> dict:
    """The result for a model registered before as version ``same``: its gate decided now if the process that
    registered it died first (or gave up), waited for if that process still runs, else left as it is."""
    name, version = cfg.model_name, str(same.version)
    state, owner = same.tags.get(GATE_STATE), same.tags.get(GATE_OWNER)
    if state in RESUMABLE or (state == "pending" and owner_dead(owner)):
        log.warning(
            "%s version %s (this model) was left with its gate %s by %s: deciding it now",
            name,
            version,
            state,
            f"process {owner}, which is gone" if state == "pending" else "an earlier registration",
        )
        client.set_model_version_tag(name, version, GATE_OWNER, _me())
        client.set_model_version_tag(name, version, GATE_STATE, "pending")
        result = _decide(client, cfg, version, score, lineage, evaluate_champion)
        return {
            **result,
            "resumed": True,
            "reason": f"the gate of version {version} (this model) finished: " + result["reason"],
        }
    if state == "pending":
        log.warning("%s version %s (this model) is being gated by %s: waiting for its decision", name, version, owner)
        _wait_decided(client, name, version, cfg.gate_wait_s)
        same = client.get_model_version(name, version)
    alias = next(iter(same.aliases), None)
    return {
        "model_name": name,
        "version": version,
        "alias": alias or "none",
        "promoted": False,
        "skipped": True,
        "reason": f"this model (dvc md5 {lineage['dvc.model']}) is already version {version}",
        "score": None,
        "champion_score": None,
        "previous_champion_version": None,
    }


def _wait_decided(client, name: str, version: str, wait_s: float, poll_s: float = 0.5) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        v = client.get_model_version(name, version)
        if v.tags.get(GATE_STATE) != "pending" or owner_dead(v.tags.get(GATE_OWNER)):
            return
        time.sleep(poll_s)


def wait_for_turn(client, name: str, version: int, wait_s: float, poll_s: float = 0.5) -> None:
    """Return once no version below ``version`` is pending. Lower versions were created, pending tag included,
    before ours. One whose registering process is gone (on this machine), or still pending after ``wait_s``
    (its process died elsewhere), is marked abandoned: a later registration of that model decides it."""
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        pending = [
            v
            for v in client.search_model_versions(f"name = '{name}' and tags.`{GATE_STATE}` = 'pending'")
            if int(v.version) < version
        ]
        dead = [v for v in pending if owner_dead(v.tags.get(GATE_OWNER))]
        if time.monotonic() > deadline:
            dead = pending
        for v in dead:
            log.warning(
                "%s version %s: version %s was left pending by %s: taken as abandoned",
                name,
                version,
                v.version,
                f"process {v.tags.get(GATE_OWNER)}, which is gone"
                if owner_dead(v.tags.get(GATE_OWNER))
                else f"a registration that did not decide in {wait_s:.0f}s",
            )
            client.set_model_version_tag(name, v.version, GATE_STATE, "abandoned")
        gone = {v.version for v in dead}
        pending = [v for v in pending if v.version not in gone]
        if not pending:
            return
        if not told:
            log.warning(
                "%s version %s: waiting for the gate of version(s) %s (%s) to decide first",
                name,
                version,
                ", ".join(str(v.version) for v in pending),
                ", ".join(sorted({v.tags.get(GATE_OWNER) or "?" for v in pending})),
            )
            told = True
        time.sleep(poll_s)


def _gate(
    client,
    cfg: RegisterConfig,
    version: str,
    score: float,
    lineage: dict,
    evaluate_champion: Callable[[str], dict] | None,
) -> dict:
    """Read the champion, decide, set the alias: run by one registration at a time."""
    import mlflow

    champion_score, champion_version = None, None
    try:
        champ = client.get_model_version_by_alias(cfg.model_name, "champion")
    except mlflow.exceptions.MlflowException:
        champ = None
    if champ is not None and str(champ.version) != str(version):
        champion_version = str(champ.version)
        # the test-set hash covers the default test split only: a benchmark's score is always re-measured
        same_test = champ.tags.get("test_set_sha256") == lineage.get("test_set_sha256") and not is_benchmark_metric(
            cfg.gate_metric
        )
        if same_test and gate_tag(cfg.gate_metric) in champ.tags:
            champion_score = float(champ.tags[gate_tag(cfg.gate_metric)])
        elif evaluate_champion is not None:
            champion_score = gate_score(evaluate_champion(f"models:/{cfg.model_name}@champion"), cfg.gate_metric)
    if champion_version is not None and champion_score is None:  # never compare across two test sets
        promote, reason = (
            False,
            (
                f"the champion (version {champion_version}) was measured on another test set and could not be "
                "re-measured on this one: kept as challenger"
            ),
        )
    else:
        promote, reason = decide(score, champion_score, cfg.margin)
    alias = "champion" if promote else "challenger"
    client.set_registered_model_alias(cfg.model_name, alias, version)
    client.set_model_version_tag(cfg.model_name, version, "gate.decision", reason)
    return {
        "model_name": cfg.model_name,
        "version": str(version),
        "alias": alias,
        "promoted": promote,
        "reason": reason,
        "score": score,
        "champion_score": champion_score,
        "previous_champion_version": champion_version,
    }


def gate_tag(metric: str) -> str:
    """The model-version tag holding the gate score (a gate on an R@k names an '@', which tags refuse)."""
    return mlflow_key(f"eval.{metric}")


def _already_registered(client, name: str, model_md5: str | None):
    """The lowest registered version whose model output has this DVC hash, if any (with its aliases)."""
    if not model_md5:
        return None
    import mlflow

    try:
        versions = client.search_model_versions(f"name = '{name}' and tags.`dvc.model` = '{model_md5}'")
    except mlflow.exceptions.MlflowException:
        return None
    versions = [v for v in versions if v.tags.get("dvc.model") == model_md5]
    if not versions:
        return None
    first = min(versions, key=lambda v: int(v.version))
    return client.get_model_version(name, first.version)  # search results omit aliases
