"""Eval stage: the re-ranking table (random, popularity and legacy order; later, models).

  python -m gr2_jax.main --config=configs/eval.py:baselines --workdir=W
"""

import ml_collections

from gr2_jax import config_lib

PRESETS = ("default", "tiny", "baselines")


def section(preset):
  c = ml_collections.ConfigDict()
  c.split = "test"
  c.rankers = ("random", "popularity", "legacy")
  c.max_examples = 0  # 0 = every slate of the split
  c.n_boot = 1000
  c.seed = 0
  if preset == "tiny":
    c.n_boot = 200
  return c


def get_config(arg=None):
  return config_lib.compose(__file__, arg, PRESETS, section)
