"""MLflow: where it tracks, runs and their metrics, the model registry and its promotion gate, the local
PostgreSQL tracking server, and runs compared side by side."""
