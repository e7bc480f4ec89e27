"""The MLflow model registry: register a logged model with lineage tags, and set ``@champion`` only if
it beats the current champion by the margin on the same test set (the champion is re-measured when it
was evaluated on another); otherwise ``@challenger``, with the reason.

Registrations may run at once (two flows against one tracking server): the gate's read-decide-set is
serialised by the registry itself. Each version is created with ``gate.state=pending`` (in the same
transaction that gives it its number) and gates only once every lower pending version has decided, so
the decisions are those of registering one after the other, in version order, on any backend and from
any machine."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from mpe.config import RegisterConfig
from mpe.records import mlflow_key
from mpe.tracking.gate import decide, gate_score, is_benchmark_metric
from mpe.tracking.runs import use
from mpe.tracking.settings import TrackingSettings

log = logging.getLogger(__name__)
GATE_STATE = "gate.state"  # pending -> decided | failed | abandoned (by a later registration that gave up waiting)


def register_and_gate(
    settings: TrackingSettings,
    cfg: RegisterConfig,
    model_uri: str,
    new_metrics: dict,
    lineage: dict,
    evaluate_champion: Callable[[str], dict] | None = None,
) -> dict:
    """Register ``model_uri`` under ``cfg.model_name``, tag it, and set ``@champion`` or ``@challenger``.
    ``evaluate_champion(model_uri) -> metrics`` re-measures a champion evaluated on another test set."""
    import mlflow

    client = use(settings)
    same = _already_registered(client, cfg.model_name, lineage.get("dvc.model"))
    if same is not None:  # nothing changed since: keep the registry as it is
        alias = next(iter(same.aliases), None)
        return {
            "model_name": cfg.model_name,
            "version": str(same.version),
            "alias": alias or "none",
            "promoted": False,
            "skipped": True,
            "reason": f"this model (dvc md5 {lineage['dvc.model']}) is already version {same.version}",
            "score": None,
            "champion_score": None,
            "previous_champion_version": None,
        }
    score = gate_score(new_metrics, cfg.gate_metric)  # a gate metric that names no metric fails before registering
    version = mlflow.register_model(model_uri, cfg.model_name, tags={GATE_STATE: "pending"})
    state = "failed"
    try:
        for k, v in lineage.items():
            client.set_model_version_tag(cfg.model_name, version.version, k, "" if v is None else str(v))
        client.set_model_version_tag(cfg.model_name, version.version, gate_tag(cfg.gate_metric), f"{score:.6f}")
        client.set_model_version_tag(cfg.model_name, version.version, "eval.metrics", json.dumps(new_metrics)[:4900])
        wait_for_turn(client, cfg.model_name, int(version.version), cfg.gate_wait_s)
        result = _gate(client, cfg, version.version, score, lineage, evaluate_champion)
        state = "decided"
        return result
    finally:  # last: a later registration waiting on this one goes on
        client.set_model_version_tag(cfg.model_name, version.version, GATE_STATE, state)


def wait_for_turn(client, name: str, version: int, wait_s: float, poll_s: float = 0.5) -> None:
    """Return once no version below ``version`` is pending; one still pending after ``wait_s`` (its process
    died) is marked abandoned. Lower versions were created, pending tag included, before ours."""
    deadline = time.monotonic() + wait_s
    while True:
        pending = [
            v.version
            for v in client.search_model_versions(f"name = '{name}' and tags.`{GATE_STATE}` = 'pending'")
            if int(v.version) < version
        ]
        if not pending:
            return
        if time.monotonic() > deadline:
            log.warning(
                "%s version %s: versions %s still pending after %.0fs: taken as abandoned",
                name,
                version,
                pending,
                wait_s,
            )
            for v in pending:
                client.set_model_version_tag(name, v, GATE_STATE, "abandoned")
            return
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
    """The registered version whose model output has this DVC hash, if any."""
    if not model_md5:
        return None
    import mlflow

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    for v in versions:
        if v.tags.get("dvc.model") == model_md5:
            return client.get_model_version(name, v.version)  # search results omit aliases
    return None
