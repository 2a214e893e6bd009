"""gr2_jax: the Generative Reasoning Re-ranker in JAX."""

__version__ = "0.1.0"
