"""Where MLflow tracks: the tracking URI and artifact location, made absolute so that Ray workers
started in another directory reach the same store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mpe.config import MlflowConfig


@dataclass(frozen=True)
class TrackingSettings:
    tracking_uri: str
    artifact_location: str
    experiment: str


def tracking_settings(cfg: MlflowConfig) -> TrackingSettings:
    uri = cfg.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    root = cfg.artifact_root
    location = root if "://" in root else Path(root).resolve().as_uri()
    return TrackingSettings(uri, location, cfg.experiment)
