"""Serving a trained re-ranker over HTTP: `python -m gr2_jax.serve --workdir=W`."""
