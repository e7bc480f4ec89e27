"""One registration for the concurrency test: imports and connects first, waits at a barrier (a file the
test creates once every registrant is ready), then registers through the promotion gate."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    from mpe.config import RegisterConfig
    from mpe.tracking.registry import register_and_gate
    from mpe.tracking.runs import use
    from mpe.tracking.settings import TrackingSettings

    settings = TrackingSettings(job["tracking_uri"], None, job["experiment"])
    use(settings)
    Path(job["ready"]).touch()
    while not Path(job["go"]).exists():
        time.sleep(0.01)
    result = register_and_gate(
        settings,
        RegisterConfig(model_name=job["model_name"], margin=0.0),
        job["model_uri"],
        job["metrics"],
        job["lineage"],
    )
    Path(job["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
