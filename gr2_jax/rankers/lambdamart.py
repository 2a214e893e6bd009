"""LambdaMART: LightGBM's `lambdarank` objective on the hand-made slate features.

One LightGBM query group per slate; trained on the training-period slates, early-stopped on the
validation slates' NDCG@1 (LightGBM's own early stopping), model saved as LightGBM text.
"""

import os
import time

import lightgbm as lgb
import numpy as np
from absl import logging

from gr2_jax.errors import UserError
from gr2_jax.rankers import features as features_lib

MODEL_FILE = "lambdamart.txt"


def _dataset(x, y, reference=None):
  n, k, f = x.shape
  return lgb.Dataset(x.reshape(n * k, f), label=y.reshape(n * k), group=np.full(n, k),
                     feature_name=list(features_lib.NAMES),
                     categorical_feature=list(features_lib.CATEGORICAL), reference=reference,
                     free_raw_data=True)


def _log_every(period):
  def callback(env):
    if period and (env.iteration + 1) % period == 0:
      vals = " ".join(f"{name} {value:.4f}" for _, name, value, _ in env.evaluation_result_list)
      logging.info("[rankers] lambdamart round %d/%d  validation %s", env.iteration + 1,
                   env.end_iteration, vals)
  callback.order = 10
  return callback


def params(c, seed):
  """LightGBM parameters of the config section `c` (rankers.lambdamart)."""
  max_grade = 2
  return {
      "objective": "lambdarank", "metric": "ndcg", "ndcg_eval_at": [1, 3],
      "learning_rate": c.learning_rate, "num_leaves": c.num_leaves,
      "min_data_in_leaf": c.min_data_in_leaf, "feature_fraction": c.feature_fraction,
      "lambdarank_truncation_level": c.truncation_level,
      "label_gain": [float(2 ** g - 1) for g in range(max_grade + 1)],
      "num_threads": c.num_threads, "seed": seed, "deterministic": True,
      "force_row_wise": True, "verbose": -1,
  }


def train(x_train, y_train, x_val, y_val, c, seed, out_dir):
  """Fits the booster (or loads `out_dir`/lambdamart.txt when a run already saved it).

  Returns (booster, info) with the rounds, best round, validation NDCG and seconds.
  """
  path = os.path.join(out_dir, MODEL_FILE)
  if os.path.isfile(path):
    logging.info("[rankers] lambdamart: loading %s", path)
    booster = lgb.Booster(model_file=path)
    return booster, {"loaded": path, "best_iteration": booster.best_iteration}
  if not (y_train > 0).any():
    raise UserError("lambdamart: the training slates hold no positive label")
  start = time.time()
  dtrain = _dataset(x_train, y_train)
  dval = _dataset(x_val, y_val, reference=dtrain)
  result = {}
  booster = lgb.train(
      params(c, seed), dtrain, num_boost_round=c.num_boost_round, valid_sets=[dval],
      valid_names=["validation"],
      callbacks=[lgb.early_stopping(c.early_stopping, first_metric_only=True, verbose=False),
                 lgb.record_evaluation(result), _log_every(c.log_every)])
  seconds = time.time() - start
  booster.save_model(path + ".tmp", num_iteration=booster.best_iteration)
  os.replace(path + ".tmp", path)
  best = booster.best_iteration or c.num_boost_round
  ndcg = {m: float(v[best - 1]) for m, v in result.get("validation", {}).items()}
  logging.info("[rankers] lambdamart: %d rounds (best %d) in %.1fs, validation %s",
               len(next(iter(result["validation"].values()), [])), best, seconds,
               " ".join(f"{m} {v:.4f}" for m, v in ndcg.items()))
  return booster, {"rounds": len(next(iter(result["validation"].values()), [])),
                   "best_iteration": best, "validation": ndcg,
                   "train_seconds": round(seconds, 1)}


def predict(booster, x):
  """Scores [N, K] of the slates' features x [N, K, F] (the best round's trees)."""
  n, k, f = x.shape
  return booster.predict(x.reshape(n * k, f), num_iteration=booster.best_iteration or None,
                         num_threads=0).reshape(n, k).astype(np.float32)


def importances(booster, top=10):
  """[(feature, share of the total split gain)] of the `top` features, largest first."""
  gain = booster.feature_importance(importance_type="gain")
  total = float(gain.sum()) or 1.0
  order = np.argsort(-gain, kind="stable")[:top]
  names = booster.feature_name()
  return [(names[i], float(gain[i] / total)) for i in order]
