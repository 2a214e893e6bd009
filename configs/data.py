"""Data stage: MovieLens-1M (or your own logs) -> temporal split and next-item examples.

  python -m gr2_jax.main --config=configs/data.py --workdir=W
  python -m gr2_jax.main --config=configs/data.py:tiny --workdir=W
  python -m gr2_jax.main --config=configs/data.py --workdir=W --config.data.source=files \
      --config.data.interactions_path=logs.parquet --config.data.items_path=items.csv
"""

import ml_collections

from gr2_jax import config_lib

PRESETS = ("default", "tiny")


def section(preset):
  c = ml_collections.ConfigDict()
  c.source = "movielens-1m"  # or "files"
  c.interactions_path = ""  # files: Parquet/CSV with user, item, timestamp[, rating]
  c.items_path = ""  # files: item, title[, year][, categories][, description]
  c.users_path = ""  # files, optional: user[, age, gender, occupation]
  c.max_users = 0  # 0 = all users; else a random subset (seeded)
  c.min_user_interactions = 5
  # Shares of interactions (by time) for: legacy ranker, LLM training, validation, test.
  c.period_fractions = (0.55, 0.24, 0.1, 0.11)
  c.max_history = 50  # history cap (most recent interactions)
  c.min_history = 5  # examples need at least this many earlier interactions
  c.label_window_items = 5  # further positives: the next N interactions of the same period...
  c.label_window_hours = 24.0  # ...within this many hours of the target
  c.seed = 0
  if preset == "tiny":
    c.max_users = 400
  return c


def get_config(arg=None):
  return config_lib.compose(__file__, arg, PRESETS, section)
