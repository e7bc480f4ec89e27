"""The hidden-state cache: the frozen trunk's output for every caption, one cache shard per data shard
(format and key in ``store``), computed locally or on Ray actors (``compute``, ``ray_engine``)."""
