"""Where and how the pipeline runs: Ray clusters kept on loopback, telemetry off, one run per project,
the compute precision chosen by measuring, and a Prefect server for one command."""
