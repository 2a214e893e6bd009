"""Data stage: MovieLens-1M (or your own logs) -> temporal split and next-item examples.

  python -m gr2_jax.main --config=configs/data.py --workdir=W
  python -m gr2_jax.main --config=configs/data.py:tiny --workdir=W
  python -m gr2_jax.main --config=configs/data.py --workdir=W --config.data.source=files \
      --config.data.interactions_path=logs.parquet --config.data.items_path=items.csv
  python -m gr2_jax.main --config=configs/data.py --workdir=W --config.data.source=impressions \
      --config.data.impressions_path=impressions.parquet --config.data.items_path=items.csv \
      [--config.data.beam_runner=DirectRunner]
"""

import ml_collections

from gr2_jax import config_lib

PRESETS = ("default", "tiny")


def section(preset):
  c = ml_collections.ConfigDict()
  c.source = "movielens-1m"  # or "files", or "impressions" (the funnel's served lists)
  c.interactions_path = ""  # files: Parquet/CSV with user, item, timestamp[, rating]
  # (impressions, optional: histories from this file instead of the log's own positives)
  c.items_path = ""  # files, impressions: item, title[, year][, categories][, description]
  c.users_path = ""  # files, impressions, optional: user[, age, gender, occupation]
  # impressions: Parquet/CSV/TSV, one row per shown item:
  # request_id, user, timestamp (s), position, item, label[, grade]
  c.impressions_path = ""
  c.slate_size = 0  # impressions: K (longer lists cut, shorter dropped); 0 = most common length
  c.chunk_rows = 1_000_000  # impressions: rows read at a time
  c.beam_runner = ""  # impressions: build the slates with Apache Beam (e.g. DirectRunner)
  c.beam_options = ""  # impressions: Beam pipeline flags, e.g. "--direct_num_workers=2"
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
