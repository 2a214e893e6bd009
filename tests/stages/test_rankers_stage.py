"""The rankers stage end to end: on the tiny MovieLens workdir (its rows in the eval table equal
the scores recomputed from their parts) and on a user's own files (the bring-your-own path)."""

import json
import os

import numpy as np
import pytest

from gr2_jax import config_lib
from gr2_jax import runner
from gr2_jax.data import slates as slates_lib
from gr2_jax.errors import UserError
from gr2_jax.eval import tables
from gr2_jax.rankers import lambdamart
from gr2_jax.rankers import scores as scores_lib
from gr2_jax.teachers import cf
from gr2_jax.teachers import cf_stats
from tests.data.test_sources import write_logs

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")


def _config(name="rankers", preset="tiny"):
  return config_lib.load_config_module(os.path.join(CONFIGS, f"{name}.py")).get_config(preset)


def test_rankers_rows_in_the_eval_table(tiny_workdir):
  config = _config("eval")
  out, _ = runner.run_stage(config, tiny_workdir, "eval")
  with open(os.path.join(out, "table.json")) as f:
    rows = json.load(f)["rows"]
  assert list(rows) == ["random", "popularity", "legacy", "legacy_refreshed", "cf",
                        "lambdamart", "prm"]
  legacy_dir = runner.artifact_dir(tiny_workdir, config, "legacy")
  rankers_dir = runner.artifact_dir(tiny_workdir, config, "rankers")
  data_dir = runner.artifact_dir(tiny_workdir, config, "data")
  test = slates_lib.load_split(legacy_dir, "test")
  # The CF row: the teacher's greedy order recomputed here.
  stats = cf_stats.load_stats(data_dir, config.rankers.window)
  order = tables.order_by_scores(cf.scores(stats, test["history"], test["slate"],
                                           cf.default_config()))
  r1 = tables.per_example(order, test)["R@1"]
  assert rows["cf"]["R@1"]["mean"] == pytest.approx(r1.mean())
  assert rows["cf"]["R@1"]["n"] == len(test["slate"])
  # Each learned row carries its paired lift over legacy; every test slate is scored.
  for name in scores_lib.RANKERS:
    assert "lift" in rows[name]
  with np.load(scores_lib.path(rankers_dir, "test")) as z:
    np.testing.assert_array_equal(z["example_id"], test["example_id"])
  with open(os.path.join(rankers_dir, "report.json")) as f:
    report = json.load(f)
  assert len(report["lambdamart"]["importances"]) == 10
  assert report["prm"]["validation_curve"][-1]["step"] == config.rankers.prm.steps
  assert set(report["seconds"]) == {"legacy_refreshed", "features", "lambdamart", "prm"}
  # The saved LambdaMART gives the test scores again.
  booster = lambdamart.lgb.Booster(model_file=os.path.join(rankers_dir, lambdamart.MODEL_FILE))
  assert booster.num_trees() >= 1


def test_eval_refuses_unknown_and_train_split_rankers(tiny_workdir):
  config = _config("eval")
  config.eval.rankers = ("legacy", "xgboost")
  with pytest.raises(UserError, match="unknown ranker"):
    runner.run_stage(config, tiny_workdir, "eval")
  config = _config("eval")
  config.eval.split = "train"
  with pytest.raises(UserError, match="validation and test splits only"):
    runner.run_stage(config, tiny_workdir, "eval")


def test_rankers_on_own_files(tmp_path):
  config = _config()
  ipath, mpath = write_logs(tmp_path, n_users=120, n_items=40, per_user=30)
  config.data.source = "files"
  config.data.interactions_path = ipath
  config.data.items_path = mpath
  config.data.min_history = 3
  config.legacy.max_examples = (0, 0, 0)
  config.sids.codebook_size = 8
  config.sids.steps = 60
  config.legacy.steps = 60
  workdir = str(tmp_path / "w")
  out, summary = runner.run_stage(config, workdir, "rankers")
  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f)
  # The files have no user attributes and no release years: those features are constant
  # (all missing), reported, and the rankers still train.
  assert {"user_gender", "user_age", "user_occupation", "item_age"} <= set(
      report["constant_features"])
  for split in ("validation", "test"):
    assert set(summary[split]) == {"legacy", *scores_lib.RANKERS}
    for row in summary[split].values():
      assert np.isfinite(row["R@1"]) and np.isfinite(row["N@3"])
