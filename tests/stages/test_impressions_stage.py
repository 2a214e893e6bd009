"""The impressions source through the stages: drop counts of bad input, the Beam build equal to
the in-memory one, and the whole tiny pipeline from a log alone."""

import importlib.util
import json
import os

import numpy as np
import pandas as pd
import pytest

from gr2_jax import config_lib
from gr2_jax import runner
from gr2_jax.data import slates as slates_lib
from gr2_jax.data import synthetic
from gr2_jax.errors import UserError

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")


def _config(name, log_path, items_path, preset="tiny", **data):
  config = config_lib.load_config_module(os.path.join(CONFIGS, name)).get_config(preset)
  config.data.source = "impressions"
  config.data.impressions_path = log_path
  config.data.items_path = items_path
  config.data.max_users = 0
  config.data.min_history = 3
  for k, v in data.items():
    config.data[k] = v
  return config


@pytest.fixture(scope="module")
def log_files(tmp_path_factory):
  folder = tmp_path_factory.mktemp("impressions")
  frame, world = synthetic.generate(num_users=300, num_items=200, requests_per_user=20, seed=1)
  imp, items = synthetic.write(str(folder), frame, world)
  frame.to_csv(folder / "impressions.csv", index=False)
  return {"parquet": imp, "csv": str(folder / "impressions.csv"), "items": items,
          "frame": frame}


def _records(data_dir):
  path = os.path.join(data_dir, "tfds", slates_lib.BUILDER_NAME, slates_lib.BUILDER_VERSION)
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  sources = tfds.builder_from_directory(path).as_data_source()
  return {split: [sources[split][i] for i in range(len(sources[split]))]
          for split in ("train", "validation", "test")}


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_beam_build_equals_in_memory(tmp_path, log_files, fmt):
  if importlib.util.find_spec("apache_beam") is None:  # not imported here: Beam runs in a child
    pytest.skip("apache_beam is not installed")
  mem_dir, _ = runner.run_stage(_config("data.py", log_files[fmt], log_files["items"]),
                                str(tmp_path / "mem"), "data")
  beam_dir, _ = runner.run_stage(
      _config("data.py", log_files[fmt], log_files["items"], beam_runner="DirectRunner"),
      str(tmp_path / "beam"), "data")
  reports = []
  for d in (mem_dir, beam_dir):
    with open(os.path.join(d, "report.json")) as f:
      reports.append(json.load(f)["slates"])
  assert [r["path"] for r in reports] == ["in-memory", "beam"]
  assert reports[0]["counts"] == reports[1]["counts"]
  assert reports[0]["per_split"] == reports[1]["per_split"]
  assert sum(reports[0]["per_split"].values()) > 300
  a, b = _records(mem_dir), _records(beam_dir)
  for split in a:
    assert len(a[split]) == len(b[split]) > 0
    for x, y in zip(a[split], b[split]):  # same order: both writers shuffle by key
      assert x.keys() == y.keys()
      for k in x:
        np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=f"{split}/{k}")


def test_bad_requests_are_dropped_and_counted(tmp_path, log_files):
  frame = log_files["frame"].copy()
  frame["label"] = frame["label"].astype(object)
  clicks = frame.groupby("user")["label"].sum()
  reqs = frame.loc[frame["user"].isin(clicks[clicks >= 10].index), "request_id"].unique()
  chosen = np.random.default_rng(0).choice(reqs, 12, replace=False)
  kinds = {"duplicate_position": chosen[:3], "unknown_item": chosen[3:5],
           "non_numeric": chosen[5:9], "timestamp_order": chosen[9:12]}
  # Users kept (min_user_interactions=5): positives of the sound requests only.
  sound = frame[~frame["request_id"].isin(chosen)]
  kept = sound.groupby("user")["label"].sum()
  busy = set(kept[kept >= 5].index)
  for r in kinds["duplicate_position"]:
    frame.loc[(frame["request_id"] == r) & (frame["position"] == 2), "position"] = 1
  for r in kinds["unknown_item"]:
    frame.loc[(frame["request_id"] == r) & (frame["position"] == 4), "item"] = "not-an-item"
  for r in kinds["non_numeric"]:
    frame.loc[(frame["request_id"] == r) & (frame["position"] == 3), "label"] = "n/a"
  for r in kinds["timestamp_order"]:
    frame.loc[(frame["request_id"] == r) & (frame["position"] == 0), "timestamp"] += 60
  path = str(tmp_path / "bad.csv")
  frame.to_csv(path, index=False)
  out, summary = runner.run_stage(_config("data.py", path, log_files["items"]),
                                  str(tmp_path / "w"), "data")
  counts = summary["slates"]["counts"]
  for kind, reqs_of_kind in kinds.items():
    assert counts[kind] == len(reqs_of_kind), (kind, counts)
  # The other requests of kept users: lists of 10, so none short; no_positive by hand.
  clean = frame[frame["user"].isin(busy) & ~frame["request_id"].isin(chosen)]
  labels = pd.to_numeric(clean["label"])
  assert counts["no_positive"] == int((labels.groupby(clean["request_id"]).sum() == 0).sum())
  assert counts["short_list"] == 0 and counts["cut"] == 0
  assert counts["user_left_out_rows"] == int((~frame["user"].isin(busy)).sum())
  assert runner.is_done(out)


def test_nothing_usable_is_an_error_and_not_done(tmp_path, log_files):
  frame = log_files["frame"].copy()
  frame["label"] = 0.0
  path = str(tmp_path / "no_clicks.parquet")
  frame.to_parquet(path)
  config = _config("data.py", path, log_files["items"])
  with pytest.raises(UserError, match="no positive event"):
    runner.run_stage(config, str(tmp_path / "w"), "data")
  assert not runner.is_done(runner.artifact_dir(str(tmp_path / "w"), config, "data"))
  config = _config("data.py", log_files["parquet"], log_files["items"], slate_size=11)
  with pytest.raises(UserError, match="no usable slate.*short_list"):
    runner.run_stage(config, str(tmp_path / "w2"), "data")
  assert not runner.is_done(runner.artifact_dir(str(tmp_path / "w2"), config, "data"))


def test_tiny_pipeline_from_an_impression_log(tmp_path, log_files):
  """configs/rl.py:tiny with nothing but the log and its item file."""
  workdir = str(tmp_path / "w")
  config = _config("rl.py", log_files["parquet"], log_files["items"])
  out, summary = runner.run_stage(config, workdir, "rl")
  assert runner.is_done(out)
  legacy_dir = runner.artifact_dir(workdir, config, "legacy")
  assert not os.path.exists(os.path.join(legacy_dir, "sasrec"))  # no legacy ranker trained
  with open(os.path.join(runner.artifact_dir(workdir, config, "data"), "report.json")) as f:
    per_split = json.load(f)["slates"]["per_split"]
  test = slates_lib.load_split(legacy_dir, "test")
  assert len(test["slate"]) == per_split["test"]
  with open(os.path.join(runner.artifact_dir(workdir, config, "midtrain"), "eval.json")) as f:
    retrieval = json.load(f)["retrieval"]["test"]
  assert "sasrec (legacy)" not in retrieval and "popularity" in retrieval
  table = open(os.path.join(out, "table.md")).read()
  for row in ("| legacy |", "| lambdamart |", "| sft |", "| rl |"):
    assert row in table


def test_histories_from_an_interactions_file(tmp_path, log_files):
  """With data.interactions_path, a slate's history is the file's events before the request."""
  frame = log_files["frame"]
  rng = np.random.default_rng(2)
  users = frame["user"].unique()
  items = pd.read_csv(log_files["items"])["item"].to_numpy()
  t0, t1 = int(frame["timestamp"].min()), int(frame["timestamp"].max())
  inter = pd.DataFrame({"user": np.repeat(users, 12),
                        "item": rng.choice(items, 12 * len(users)),
                        "timestamp": rng.integers(t0 - 86400, t1, 12 * len(users)),
                        "rating": rng.integers(1, 6, 12 * len(users))})
  inter = inter.drop_duplicates(["user", "timestamp"])
  path = str(tmp_path / "inter.csv")
  inter.to_csv(path, index=False)
  config = _config("legacy.py", log_files["parquet"], log_files["items"], interactions_path=path)
  workdir = str(tmp_path / "w")
  legacy_dir, _ = runner.run_stage(config, workdir, "legacy")
  data_dir = runner.artifact_dir(workdir, config, "data")
  with open(os.path.join(data_dir, "items.json")) as f:
    key_of_item = {it["id"]: it["key"] for it in json.load(f)["items"]}
  with open(os.path.join(data_dir, "users.json")) as f:
    key_of_user = {u["id"]: u["key"] for u in json.load(f)["users"]}
  test = slates_lib.load_split(legacy_dir, "test")
  assert len(test["slate"]) > 20
  for i in range(20):
    u, ts = key_of_user[int(test["user"][i])], int(test["timestamp"][i])
    mine = inter[(inter["user"] == u) & (inter["timestamp"] < ts)].sort_values("timestamp")
    want = mine["item"].tolist()[-config.data.max_history:]
    got = [key_of_item[int(x)] for x in test["history"][i] if x >= 0]
    assert got == want
