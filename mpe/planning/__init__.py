"""The planner (``mpe plan``): what a params file costs on a cluster before anyone pays for it — the download,
the cache's bytes and trunk FLOPs, the training steps and their FLOPs, and each stage's time and
accelerator-hours — from the model's configuration (FLOPs counted on the meta device), the corpus's measured
per-sample figures, and a cluster description (``cluster``); ``plan`` puts them together."""
