"""Tests of the training-period CF statistics on a hand-made log."""

import numpy as np
import pytest

from gr2_jax.teachers import cf_stats

ITEMS = [{"id": 0, "genres": ["Comedy"]}, {"id": 1, "genres": ["Drama", "Comedy"]},
         {"id": 2, "genres": ["Drama"]}, {"id": 3, "genres": ["Horror"]},
         {"id": 4, "genres": []}]


def log(rows):
  """rows: (user, item, timestamp, period), in any order."""
  a = np.array(rows)
  return {"user": a[:, 0].astype(np.int32), "item": a[:, 1].astype(np.int32),
          "timestamp": a[:, 2].astype(np.int64), "period": a[:, 3].astype(np.int8),
          "rating": np.ones(len(a), np.float32)}


# user 0: 0, 1, 2 (legacy period) then 3 (validation); user 1: 1, 2 (train) then 4 (test) and
# 0 tied in time with 2 (its smaller id puts it before 2). Rows deliberately shuffled.
LOG = log([(0, 2, 3, 0), (1, 4, 20, 3), (0, 0, 1, 0), (1, 1, 5, 1), (0, 3, 10, 2),
           (0, 1, 2, 0), (1, 2, 6, 1), (1, 0, 6, 1)])


def test_counts_by_hand_window_1():
  s = cf_stats.compute_stats(LOG, ITEMS, window=1)
  # Training sequences: user 0: 0 1 2; user 1: 1 0 2.
  np.testing.assert_array_equal(s.popularity, [2, 2, 2, 0, 0])
  trans = np.zeros((5, 5))
  trans[0, 1] = trans[1, 2] = 1  # u0
  trans[1, 0] = trans[0, 2] = 1  # u1
  np.testing.assert_array_equal(s.transitions, trans)
  np.testing.assert_array_equal(s.cooc, trans + trans.T)


def test_window_2_adds_pairs_two_apart():
  s = cf_stats.compute_stats(LOG, ITEMS, window=2)
  # Adjacent pairs, then pairs two apart: (0, 2) for u0, (1, 2) for u1.
  expected = np.zeros((5, 5))
  for a, b in [(0, 1), (1, 2), (1, 0), (0, 2), (0, 2), (1, 2)]:
    expected[a, b] += 1
    expected[b, a] += 1
  np.testing.assert_array_equal(s.cooc, expected)
  assert s.transitions[2, 0] == 0 and s.transitions[1, 2] == 1  # transitions stay one step


def test_validation_and_test_interactions_are_excluded():
  s = cf_stats.compute_stats(LOG, ITEMS, window=3)
  # Item 3 (validation) follows 2 for user 0 and item 4 (test) follows 2 for user 1.
  assert s.popularity[3] == 0 and s.popularity[4] == 0
  assert s.cooc[:, 3].sum() == 0 and s.cooc[:, 4].sum() == 0
  assert s.transitions[2, 3] == 0 and s.transitions[2, 4] == 0
  # Moving them into the train period makes them count: the mask is what excludes them.
  moved = dict(LOG, period=np.minimum(LOG["period"], 1))
  s2 = cf_stats.compute_stats(moved, ITEMS, window=3)
  assert s2.transitions[2, 3] == 1 and s2.transitions[2, 4] == 1


def test_genre_matrix():
  m, genres = cf_stats.genre_matrix(ITEMS)
  assert genres == ("Comedy", "Drama", "Horror")
  np.testing.assert_array_equal(m, [[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]])


def test_bad_window():
  with pytest.raises(ValueError):
    cf_stats.compute_stats(LOG, ITEMS, window=0)


def _random_log(seed, users=6, items=7, per_user=9):
  rng = np.random.default_rng(seed)
  rows = []
  for u in range(users):
    ts = np.sort(rng.integers(0, 40, per_user))  # same-second ties included
    for t in ts:
      rows.append((u, int(rng.integers(0, items)), int(t), int(min(3, t // 10))))  # re-watches too
  return log(rows), [{"id": i, "genres": []} for i in range(items)]


@pytest.mark.parametrize("window", [1, 3])
def test_own_counts_leave_the_user_out(window):
  inter, items = _random_log(window)
  full = cf_stats.compute_stats(inter, items, window=window)
  own = cf_stats.OwnCounts(inter, len(items), window=window)
  a, b = np.meshgrid(np.arange(len(items)), np.arange(len(items)), indexing="ij")
  for u in range(6):
    # Reference: the statistics recomputed without user u's rows.
    rest = {k: v[inter["user"] != u] for k, v in inter.items()}
    ref = cf_stats.compute_stats(rest, items, window=window)
    np.testing.assert_array_equal(full.cooc - own.cooc(u, a, b), ref.cooc)
    np.testing.assert_array_equal(full.transitions - own.transitions(u, a, b), ref.transitions)
    np.testing.assert_array_equal(full.popularity - own.popularity(u, np.arange(len(items))),
                                  ref.popularity)
  assert (own.cooc(-1, a, b) == 0).all()  # user -1: no correction
