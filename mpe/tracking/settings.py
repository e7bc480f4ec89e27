"""Where MLflow tracks: which URI wins (``--tracking-uri``, then ``MLFLOW_TRACKING_URI``, then params), and
the tracking URI and artifact location made absolute so that Ray workers
started in another directory reach the same store. With a tracking server (``http(s)://``) a local
``artifact_root`` is not used: the server stores artifacts where it was told (``--artifacts-destination``)
and clients on any machine reach them through it; a URL root (``s3://...``) is used as given."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mpe.config import MlflowConfig, Params


@dataclass(frozen=True)
class TrackingSettings:
    tracking_uri: str
    artifact_location: str | None  # None: the tracking server's default
    experiment: str


def tracking_settings(cfg: MlflowConfig) -> TrackingSettings:
    uri = cfg.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    root = cfg.artifact_root
    if "://" in root:
        location = root
    else:
        location = None if is_server(uri) else Path(root).resolve().as_uri()
    return TrackingSettings(uri, location, cfg.experiment)


def is_server(uri: str) -> bool:
    """Whether ``uri`` is a tracking server (HTTP) rather than a store this process opens itself."""
    return uri.split("://", 1)[0].lower() in ("http", "https")


TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


def resolve_tracking_uri(params: Params) -> Params:
    """``params`` with the tracking URI MLflow users expect to win: MLflow's own ``MLFLOW_TRACKING_URI`` when
    it is set (``--tracking-uri`` sets it for a command and the stages it runs), else params'
    ``mlflow.tracking_uri``. Every command, the flows and ``mpe ui`` resolve it here, once, when they load
    their params; library code then reads ``params.mlflow`` only."""
    uri = os.environ.get(TRACKING_URI_ENV)
    if not uri or uri == params.mlflow.tracking_uri:
        return params
    return params.model_copy(update={"mlflow": params.mlflow.model_copy(update={"tracking_uri": uri})})
