"""Rankers stage: the re-rankers a practitioner would try first, scored on the validation and
test slates for every final table (eval stage, RL stage).

  python -m gr2_jax.main --config=configs/rankers.py --workdir=W
  python -m gr2_jax.main --config=configs/rankers.py:tiny --workdir=W

- legacy_refreshed: SASRec (the legacy section's settings) retrained on the legacy and LLM-train
  periods together, re-ranking the same slates: how much of a lift is freshness alone;
- cf: the CF teacher's greedy order (`teachers/cf.py` defaults);
- lambdamart: LightGBM lambdarank on hand-made features (`rankers/features.py`);
- prm: a PRM-style listwise transformer over the slate (`rankers/prm.py`).
"""

import ml_collections

from gr2_jax import config_lib

PRESETS = ("default", "tiny")


def section(preset):
  c = ml_collections.ConfigDict()
  c.rankers = ("legacy_refreshed", "cf", "lambdamart", "prm")
  c.label = "labels"  # training relevance: target (one-hot) | labels (every positive) | grades
  c.max_train = 0  # training-period slates used (0 = all the legacy stage cut)
  c.max_validation = 0  # validation slates (early stopping, PRM evals; 0 = all)
  c.recent_days = 7  # the "recent popularity" window, at the end of the training periods
  c.window = 5  # co-occurrence window of the CF statistics (the CF teacher's)
  c.n_boot = 1000
  c.seed = 0
  c.refresh_steps = 800  # SASRec steps on legacy + train (its other settings: legacy section)

  c.lambdamart = ml_collections.ConfigDict()
  c.lambdamart.num_boost_round = 500
  c.lambdamart.early_stopping = 50  # rounds without a better validation NDCG@1
  c.lambdamart.learning_rate = 0.05
  c.lambdamart.num_leaves = 31
  c.lambdamart.min_data_in_leaf = 50
  c.lambdamart.feature_fraction = 0.9
  c.lambdamart.truncation_level = 10
  c.lambdamart.num_threads = 0  # 0 = LightGBM's default (all cores)
  c.lambdamart.log_every = 50

  c.prm = ml_collections.ConfigDict()
  # Chosen on the MovieLens-1M validation slates (BENCHMARKS.md): with ~5.7k training slates
  # a wider model or more steps overfits.
  c.prm.dim = 32
  c.prm.num_layers = 2
  c.prm.num_heads = 4
  c.prm.mlp_dim = 64
  c.prm.history = 10
  c.prm.steps = 300
  c.prm.batch_size = 128
  c.prm.learning_rate = 1e-3
  c.prm.warmup_steps = 50
  c.prm.weight_decay = 1e-4
  c.prm.eval_every = 100
  c.prm.log_every = 50
  c.prm.checkpoint_every = 200
  c.prm.num_devices = 0  # 0 = all; the mesh is (data = devices, 1, 1)

  if preset == "tiny":
    c.n_boot = 200
    c.refresh_steps = 50
    c.lambdamart.num_boost_round = 20
    c.lambdamart.early_stopping = 10
    c.lambdamart.min_data_in_leaf = 5
    c.lambdamart.log_every = 10
    c.prm.dim = 16
    c.prm.mlp_dim = 32
    c.prm.num_heads = 2
    c.prm.steps = 12
    c.prm.batch_size = 16
    c.prm.warmup_steps = 2
    c.prm.eval_every = 6
    c.prm.log_every = 4
    c.prm.checkpoint_every = 6
  return c


def get_config(arg=None):
  return config_lib.compose(__file__, arg, PRESETS, section)
