"""Training: one optimisation step, the Ray Train worker loop, optimiser and schedule, checkpoints, where a
run starts and which run it is."""
