"""Slate features: hand-computed values, and leave-user-out equal to the statistics recomputed
without the user."""

import os

import numpy as np
import pytest

from gr2_jax.data import artifacts
from gr2_jax.rankers import features as features_lib
from gr2_jax.teachers import cf
from gr2_jax.teachers import cf_stats

DAY = 86400
ITEMS = [{"id": i, "key": str(i), "title": f"t{i}", "year": 1990 + i,
          "genres": ["Drama"] if i % 2 else ["Comedy"]} for i in range(6)]
ITEMS[5]["year"] = None
USERS = [{"id": 0, "age": 25, "gender": "M", "occupation": 3},
         {"id": 1, "age": 35, "gender": "F", "occupation": 7},
         {"id": 2}]


def _write(path, rows, users=USERS):
  """rows: (user, item, rating, day, period) -> a data artifact folder."""
  os.makedirs(path, exist_ok=True)
  rows = sorted(rows, key=lambda r: (r[0], r[3], r[1]))
  a = np.array(rows, np.float64)
  artifacts.save_interactions(str(path), {
      "user": a[:, 0].astype(np.int32), "item": a[:, 1].astype(np.int32),
      "rating": a[:, 2].astype(np.float32), "timestamp": (a[:, 3] * DAY).astype(np.int64),
      "period": a[:, 4].astype(np.int8)})
  artifacts.save_items(str(path), ITEMS)
  artifacts.save_users(str(path), users)
  cf_stats.load_stats.cache_clear()
  return str(path)


# Training periods: days 0..19; the last 7 days (13..19) are "recent".
ROWS = [(0, 0, 5, 1, 0), (0, 1, 4, 2, 0), (0, 2, 3, 14, 1), (0, 3, 5, 15, 1),
        (1, 1, 2, 3, 0), (1, 2, 4, 16, 1), (1, 3, 1, 17, 1), (1, 4, 5, 19, 1),
        (2, 0, 4, 5, 0), (2, 2, 5, 18, 1), (2, 5, 3, 30, 3)]


def _slates(user, history, slate, day):
  n = len(slate)
  return {"user": np.array([user]), "history": np.array([history]),
          "slate": np.array([slate]), "slate_scores": np.array([np.linspace(1, 0, n)], np.float32),
          "timestamp": np.array([day * DAY])}


def test_hand_computed_features(tmp_path):
  fb = features_lib.FeatureBuilder(_write(tmp_path, ROWS), cf.default_config(), recent_days=7)
  s = _slates(0, [-1, 0, 1], [2, 3, 4, 5], day=365.25 * 30)  # year 2000
  x = fb(s, leave_user_out=False)[0]
  col = {n: x[:, j] for j, n in enumerate(features_lib.NAMES)}
  np.testing.assert_allclose(col["popularity"], np.log1p([3, 2, 1, 0]))
  np.testing.assert_allclose(col["recent_popularity"], np.log1p([3, 2, 1, 0]))
  g = (5 + 4 + 3 + 2 + 4 + 5 + 1 + 5 + 4 + 5) / 10  # mean training rating
  np.testing.assert_allclose(col["mean_rating"], [(12 + 5 * g) / 8, (6 + 5 * g) / 7,
                                                  (5 + 5 * g) / 6, g], rtol=1e-5)
  np.testing.assert_allclose(col["item_age"][:3], [2000 - 1992, 2000 - 1993, 2000 - 1994],
                             rtol=1e-4)
  assert np.isnan(col["item_age"][3])  # no release year
  np.testing.assert_allclose(col["legacy_slot"], [0, 1, 2, 3])
  np.testing.assert_allclose(col["legacy_gap"], np.linspace(1, 0, 4) - 1, atol=1e-6)
  assert (col["user_gender"] == 1).all() and (col["user_occupation"] == 3).all()
  np.testing.assert_allclose(col["history_length"], np.log1p(2))
  # Co-watched within window 5, with history items 0 and 1 (user orders: 0 1 2 3 | 1 2 3 4 |
  # 0 2): item 2: (0,2) u0 + (1,2) u0 + (1,2) u1 + (0,2) u2 = 4; item 3: 2 + 1 = 3; item 4: 1.
  np.testing.assert_allclose(col["cowatched"], np.log1p([4, 3, 1, 0]))
  z = col["popularity_z"]
  np.testing.assert_allclose(z, cf.standardize(col["popularity"][None])[0], rtol=1e-6)
  # A user without attributes gets NaN there.
  x2 = fb(_slates(2, [-1, -1, 0], [1, 3, 4, 5], day=20), leave_user_out=False)[0]
  assert np.isnan(x2[:, features_lib.NAMES.index("user_age")]).all()


@pytest.mark.parametrize("user", [0, 1])
def test_leave_user_out_equals_statistics_without_the_user(tmp_path, user):
  full = features_lib.FeatureBuilder(_write(tmp_path / "full", ROWS), cf.default_config())
  s = _slates(user, [-1, 0, 1], [2, 3, 4, 5], day=14)
  loo = full(s, leave_user_out=True)[0]
  # Reference: the same features of a log without the user's training interactions.
  rest = [r for r in ROWS if r[0] != user or r[4] > 1]
  ref_b = features_lib.FeatureBuilder(_write(tmp_path / "rest", rest), cf.default_config())
  ref = ref_b(s, leave_user_out=False)[0]
  for name in ("popularity", "recent_popularity", "cowatched"):
    j = features_lib.NAMES.index(name)
    np.testing.assert_allclose(loo[:, j], ref[:, j], rtol=1e-5, err_msg=name)
  # The mean rating leaves the user's ratings out but keeps the full log's prior.
  g = np.mean([r[2] for r in ROWS if r[4] <= 1])
  others = [[r[2] for r in ROWS if r[1] == i and r[0] != user and r[4] <= 1] for i in (2, 3, 4, 5)]
  np.testing.assert_allclose(loo[:, features_lib.NAMES.index("mean_rating")],
                             [(sum(o) + 5 * g) / (len(o) + 5) for o in others], rtol=1e-5)
  # The user's own future shows without the correction.
  plain = full(s, leave_user_out=False)[0]
  j = features_lib.NAMES.index("popularity")
  assert (plain[:, j] >= loo[:, j]).all() and (plain[:, j] > loo[:, j]).any()


def test_labels_and_constant_features():
  s = {"slate": np.zeros((2, 3), np.int64), "target_index": np.array([1, 2]),
       "labels": np.array([[1, 1, 0], [0, 0, 1]], np.int8),
       "grades": np.array([[2, 1, 0], [0, 0, 1]], np.int8)}
  np.testing.assert_array_equal(features_lib.labels(s, "target"), [[0, 1, 0], [0, 0, 1]])
  np.testing.assert_array_equal(features_lib.labels(s, "grades"), s["grades"])
  with pytest.raises(ValueError, match="target, labels or grades"):
    features_lib.labels(s, "clicks")
  x = np.random.default_rng(0).normal(size=(4, 3, len(features_lib.NAMES)))
  x[..., 2] = 7.0
  x[..., 5] = np.nan
  assert features_lib.constant_features(x) == [features_lib.NAMES[2], features_lib.NAMES[5]]


def test_empty_history_gives_zero_history_features_and_one_candidate_is_refused(tmp_path):
  fb = features_lib.FeatureBuilder(_write(tmp_path, ROWS), cf.default_config())
  x = fb(_slates(1, [-1, -1, -1], [0, 2, 5], day=20), leave_user_out=False)[0]
  for name in ("cooc", "transition", "genre", "cowatched", "history_length"):
    assert (x[:, features_lib.NAMES.index(name)] == 0).all(), name
  assert np.isfinite(np.delete(x, features_lib.NAMES.index("item_age"), axis=1)).all()
  with pytest.raises(ValueError, match="at least 2 candidates"):
    fb(_slates(1, [-1, 0, 1], [2], day=20), leave_user_out=False)
