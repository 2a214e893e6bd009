"""Eval stage: the re-ranking table (random, popularity, legacy order, the learned re-rankers
of the rankers stage, and model rows).

  python -m gr2_jax.main --config=configs/eval.py:baselines --workdir=W
  python -m gr2_jax.main --config=configs/eval.py --workdir=W \
      --config.eval.checkpoints='("sft-rejection=W/sft/<fp>", "sft-targeted=W/sft/<fp2>")'
"""

import ml_collections

from gr2_jax import config_lib

PRESETS = ("default", "tiny", "baselines", "smollm2")


def section(preset):
  c = ml_collections.ConfigDict()
  c.split = "test"
  # Baselines: random, popularity, legacy, and the rankers stage's legacy_refreshed, cf,
  # lambdamart, prm (configs/rankers.py).
  c.rankers = ("random", "popularity", "legacy", "legacy_refreshed", "cf", "lambdamart", "prm")
  c.max_examples = 0  # 0 = every slate of the split
  c.n_boot = 1000
  c.seed = 0
  # Model rows: "name=folder" of artifacts holding a re-ranking checkpoint (an sft artifact).
  # They re-rank a seeded subset of `model_examples` slates by greedy decoding, without and
  # with the slate constraint in the answer; the baselines are scored again on that subset.
  c.checkpoints = ()
  c.model_examples = 192
  c.max_new_tokens = 240  # CF-teacher answers are ~220 tokens with the demo tokenizer
  c.batch_size = 48
  c.constrained = (False, True)
  if preset == "smollm2":
    c.max_new_tokens = 40
  if preset == "tiny":
    c.n_boot = 200
    c.model_examples = 4
    c.max_new_tokens = 24
    c.batch_size = 4
  return c


def get_config(arg=None):
  return config_lib.compose(__file__, arg, PRESETS, section)
