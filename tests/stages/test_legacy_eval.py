"""Tiny data + legacy + eval stages end to end on the real MovieLens-1M download."""

import json
import os

import numpy as np

from gr2_jax import config_lib
from gr2_jax import runner
from gr2_jax.data import artifacts
from gr2_jax.data import pipeline
from gr2_jax.data import preprocess
from gr2_jax.data import slates as slates_lib
from gr2_jax.eval import compare

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")


def _dirs(workdir):
  config = config_lib.load_config_module(os.path.join(CONFIGS, "eval.py")).get_config("tiny")
  return config, runner.artifact_dir(workdir, config, "data"), runner.artifact_dir(
      workdir, config, "legacy")


def test_split_is_temporal_and_examples_follow_it(tiny_workdir):
  _, data_dir, _ = _dirs(tiny_workdir)
  inter = artifacts.load_interactions(data_dir)
  # Periods never go back in time.
  ts, period = inter["timestamp"], inter["period"]
  for p in range(3):
    assert ts[period == p].max() < ts[period == p + 1].min()
  ex = preprocess.load_examples(os.path.join(data_dir, "examples.npz"))
  assert set(np.unique(ex["period"])) <= {1, 2, 3}
  # Histories are the user's interactions strictly earlier in time than the target.
  for i in range(0, len(ex["target"]), 997):
    lo, n = ex["tie_lo"][i], ex["history_len"][i]
    np.testing.assert_array_equal(ex["history"][i, -n:], inter["item"][lo - n:lo])
    assert (inter["user"][lo - n:lo] == ex["user"][i]).all()
    assert (inter["timestamp"][lo - n:lo] < ex["timestamp"][i]).all()
    assert inter["item"][ex["index"][i]] == ex["target"][i]


def test_slates_hold_the_target_and_no_seen_or_tied_items(tiny_workdir):
  _, data_dir, legacy_dir = _dirs(tiny_workdir)
  inter = artifacts.load_interactions(data_dir)
  ex = preprocess.load_examples(os.path.join(data_dir, "examples.npz"))
  with open(os.path.join(legacy_dir, "report.json")) as f:
    report = json.load(f)
  for period, split in slates_lib.SPLITS.items():
    s = slates_lib.load_split(legacy_dir, split)
    assert len(s["slate"]) == report["coverage"][split]["slates"] > 0
    rows = np.arange(len(s["slate"]))
    np.testing.assert_array_equal(s["slate"][rows, s["target_index"]], s["target"])
    assert (s["labels"][rows, s["target_index"]] == 1).all()
    assert (np.sort(s["slate"], 1)[:, 1:] != np.sort(s["slate"], 1)[:, :-1]).all()
    assert (np.diff(s["slate_scores"], axis=1) <= 0).all()  # legacy order = descending score
    for j in range(min(len(rows), 30)):
      e = s["example_id"][j]
      assert ex["period"][e] == period
      seen = set(ex["history"][e][ex["history"][e] >= 0].tolist())
      tied = set(inter["item"][ex["tie_lo"][e]:ex["tie_hi"][e]].tolist()) - {ex["target"][e]}
      assert not (set(s["slate"][j].tolist()) & (seen | tied))


def test_grain_pipeline_batches_and_shuffles_reproducibly(tiny_workdir):
  _, _, legacy_dir = _dirs(tiny_workdir)
  ds = pipeline.slate_dataset(legacy_dir, "train", max_history=8, batch_size=4, shuffle=True,
                              seed=3)
  first = ds[0]
  assert first["history"].shape == (4, 8) and first["slate"].shape == (4, 10)
  again = pipeline.slate_dataset(legacy_dir, "train", max_history=8, batch_size=4, shuffle=True,
                                 seed=3)[0]
  np.testing.assert_array_equal(first["example_id"], again["example_id"])
  rec = slates_lib.data_sources(legacy_dir)["train"][0]
  padded = pipeline.pad_history(rec, 200)
  n = len(rec["history"])
  assert padded["history_len"] == n and (padded["history"][:200 - n] == -1).all()


def test_baseline_table(tiny_workdir):
  config, _, legacy_dir = _dirs(tiny_workdir)
  out, summary = runner.run_stage(config, tiny_workdir, "eval")
  with open(os.path.join(out, "table.json")) as f:
    rows = json.load(f)["rows"]
  s = slates_lib.load_split(legacy_dir, "test")
  # Legacy R@1 is the share of slates whose target the legacy ranker put first.
  assert rows["legacy"]["R@1"]["mean"] == np.mean(s["target_index"] == 0)
  assert rows["legacy"]["R@1"]["n"] == len(s["slate"])
  assert set(rows) == set(compare.BASELINES)
  assert "lift" in rows["random"] and "lift" not in rows["legacy"]
  assert summary["slates"] == len(s["slate"])
