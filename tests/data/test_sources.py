"""Bring-your-own-data files: what is read, and the one-line errors for what is wrong."""

import numpy as np
import pandas as pd
import pytest

from gr2_jax.data import sources
from gr2_jax.errors import UserError


def write_logs(folder, n_users=30, n_items=40, per_user=30, seed=0):
  """A synthetic log in the user-file format; returns (interactions path, items path)."""
  rng = np.random.default_rng(seed)
  rows = []
  for u in range(n_users):
    t = np.sort(rng.integers(0, 10_000, per_user))
    for i, ts in zip(rng.choice(n_items, per_user, replace=False), t):
      rows.append((f"user{u}", f"item{i}", int(ts), int(rng.integers(1, 6))))
  inter = pd.DataFrame(rows, columns=["user", "item", "timestamp", "rating"])
  items = pd.DataFrame({"item": [f"item{i}" for i in range(n_items)],
                        "title": [f"Title {i}" for i in range(n_items)],
                        "categories": ["Drama|Comedy" if i % 2 else "Horror" for i in range(n_items)]})
  ipath, mpath = folder / "interactions.csv", folder / "items.parquet"
  inter.to_csv(ipath, index=False)
  items.to_parquet(mpath)
  return str(ipath), str(mpath)


def test_reads_user_files(tmp_path):
  ipath, mpath = write_logs(tmp_path)
  raw = sources.load_user_files(ipath, mpath)
  assert len(raw.interactions) == 900
  assert raw.items["genres"].iloc[1] == ["Drama", "Comedy"]
  assert raw.interactions["timestamp"].dtype == np.int64


def test_missing_column(tmp_path):
  ipath, mpath = write_logs(tmp_path)
  pd.read_csv(ipath).drop(columns="timestamp").to_csv(ipath, index=False)
  with pytest.raises(UserError, match="lacks column.*timestamp"):
    sources.load_user_files(ipath, mpath)


def test_unknown_items(tmp_path):
  ipath, mpath = write_logs(tmp_path)
  frame = pd.read_csv(ipath)
  frame.loc[3, "item"] = "ghost"
  frame.to_csv(ipath, index=False)
  with pytest.raises(UserError, match="1 interaction.*'ghost'"):
    sources.load_user_files(ipath, mpath)


def test_duplicate_item_ids(tmp_path):
  ipath, mpath = write_logs(tmp_path)
  items = pd.read_parquet(mpath)
  items.loc[1, "item"] = "item0"
  items.to_parquet(mpath)
  with pytest.raises(UserError, match="duplicate item ids.*'item0'"):
    sources.load_user_files(ipath, mpath)


def test_empty_and_malformed_files(tmp_path):
  ipath, mpath = write_logs(tmp_path)
  empty = tmp_path / "empty.csv"
  empty.write_text("user,item,timestamp\n")
  with pytest.raises(UserError, match="is empty"):
    sources.load_user_files(str(empty), mpath)
  bad = tmp_path / "bad.parquet"
  bad.write_bytes(b"not parquet")
  with pytest.raises(UserError, match="could not be read"):
    sources.load_user_files(ipath, str(bad))
  with pytest.raises(UserError, match="does not exist"):
    sources.load_user_files(str(tmp_path / "nope.csv"), mpath)
  frame = pd.read_csv(ipath)
  frame["timestamp"] = frame["timestamp"].astype(str)
  frame.loc[5, "timestamp"] = "yesterday"
  frame.to_csv(ipath, index=False)
  with pytest.raises(UserError, match="row 5 is not a number"):
    sources.load_user_files(ipath, mpath)
