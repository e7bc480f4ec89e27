"""Where a model came from: DVC from Python, each run's record (lock, params), lineage tags, and bringing a
registered version back (``mpe reproduce``)."""
