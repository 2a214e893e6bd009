"""Legacy stage: SASRec trained on the legacy period hands each example its top-K slate.

  python -m gr2_jax.main --config=configs/legacy.py --workdir=W
"""

import ml_collections

from gr2_jax import config_lib

PRESETS = ("default", "tiny")


def section(preset):
  c = ml_collections.ConfigDict()
  c.slate_size = 10  # K
  c.max_len = 50  # SASRec input length
  c.dim = 64
  c.num_blocks = 2
  c.num_heads = 1
  c.dropout = 0.2
  c.steps = 800
  c.batch_size = 128
  c.learning_rate = 2e-3
  c.num_negatives = 512  # sampled-softmax negatives per step; 0 = full softmax
  c.positive_rating = 4.0  # positives rated at least this get grade 2, others grade 1
  c.score_batch = 1024
  # Examples scored per split (train, validation, test); 0 = all. Seeded random subsets keep
  # the train split (traces and RL use a few thousand slates) and the validation split (model
  # selection only) cheap; the test split is scored in full.
  c.max_examples = (60000, 40000, 0)
  c.seed = 0
  if preset == "tiny":
    c.dim = 32
    c.steps = 200
  return c


def get_config(arg=None):
  return config_lib.compose(__file__, arg, PRESETS, section)
