"""The backend as a pipeline: options, the rewrite loop, cache keys, fallbacks, Inductor fixes."""
