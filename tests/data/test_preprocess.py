"""Ids, chronological order, temporal split and examples on a log small enough to check by hand."""

import numpy as np
import pandas as pd
import pytest

from gr2_jax.data import preprocess
from gr2_jax.data.sources import RawData
from gr2_jax.errors import UserError


def _raw():
  # user u1: items at t = 1, 2, 3, 3 (tie), 10, 11; user u2: 5 interactions.
  inter = pd.DataFrame({
      "user": ["u1"] * 6 + ["u2"] * 5,
      "item": ["d", "b", "c", "a", "e", "b2", "a", "b", "c", "d", "e"],
      "timestamp": [1, 2, 3, 3, 10, 11, 1, 4, 6, 8, 12],
      "rating": [5, 4, 3, 5, 2, 4, 5, 5, 5, 5, 1],
  })
  keys = ["a", "b", "b2", "c", "d", "e", "unused"]
  items = pd.DataFrame({"item": keys, "title": [k.upper() for k in keys],
                        "year": pd.array([2000] * 7, dtype="Int64"),
                        "genres": [["Drama"]] * 7, "description": ""})
  users = pd.DataFrame({"user": ["u1", "u2"], "age": [25, 35], "gender": ["F", "M"],
                        "occupation": [1, 2]})
  return RawData(inter, items, users, "test")


def test_assign_ids_orders_by_user_time_then_item():
  items, users, inter = preprocess.assign_ids(_raw())
  assert [it["key"] for it in items] == ["a", "b", "b2", "c", "d", "e"]  # unused item dropped
  assert users[0] == {"id": 0, "key": "u1", "age": 25, "gender": "F", "occupation": 1}
  u1 = inter["item"][inter["user"] == 0]
  # d(t1) b(t2) then the tie at t3 broken by item id: a (0) before c (3), then e, b2.
  np.testing.assert_array_equal(u1, [4, 1, 0, 3, 5, 2])


def test_split_periods_cuts_by_time_and_keeps_ties_together():
  ts = np.array([1, 2, 3, 3, 4, 5, 6, 7, 8, 9])
  period, cuts = preprocess.split_periods(ts, (0.3, 0.3, 0.2, 0.2))
  # Cuts are the "higher" quantiles at 0.3, 0.6, 0.8: sorted positions 2.7 -> 3, 5.4 -> 6,
  # 7.2 -> 8, i.e. timestamps 3, 6, 8; period p holds [cut[p-1], cut[p]).
  assert list(cuts) == [3, 6, 8]
  np.testing.assert_array_equal(period, [0, 0, 1, 1, 1, 1, 2, 2, 3, 3])
  with pytest.raises(UserError):
    preprocess.split_periods(ts, (0.5, 0.5, 0.1, 0.1))


def test_build_examples_history_further_and_ties():
  _, _, inter = preprocess.assign_ids(_raw())
  inter["period"] = np.where(inter["timestamp"] >= 3, 1, 0).astype(np.int8)
  ex = preprocess.build_examples(inter, max_history=3, min_history=2, window_items=2,
                                 window_seconds=5)
  u1 = ex["user"] == 0
  # u1 interactions from t=3 on are period 1 and have >= 2 earlier ones: a, c, e, b2.
  np.testing.assert_array_equal(ex["target"][u1], [0, 3, 5, 2])
  # Target a (t3): history d, b right-aligned in width 3.
  np.testing.assert_array_equal(ex["history"][u1][0], [-1, 4, 1])
  # c shares t=3 with a: its history stops before the tie, so a is not in it.
  np.testing.assert_array_equal(ex["history"][u1][1], [-1, 4, 1])
  np.testing.assert_array_equal(ex["history"][u1][2], [1, 0, 3])
  np.testing.assert_array_equal(ex["history_len"][u1], [2, 2, 3, 3])
  # Further positives of a: c (t3, 0 s later) and e (t10, 7 s later: outside the 5 s window).
  np.testing.assert_array_equal(ex["further"][u1][0], [3, -1])
  # a and c share t=3: both examples see the same tie range of two interactions.
  lo, hi = ex["tie_lo"][u1], ex["tie_hi"][u1]
  assert (hi - lo)[:2].tolist() == [2, 2] and (hi - lo)[2:].tolist() == [1, 1]
  np.testing.assert_array_equal(inter["item"][lo[0]:hi[0]], [0, 3])


def test_empty_title_is_an_error():
  raw = _raw()
  raw.items.loc[0, "title"] = " "
  with pytest.raises(UserError, match="empty title"):
    preprocess.assign_ids(raw)
