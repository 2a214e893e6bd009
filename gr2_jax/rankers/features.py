"""Hand-made features of each (slate, candidate) for the learned re-rankers.

Every statistic comes from the training periods (legacy + LLM-train) only, through the CF
teacher's `cf_stats` and `cf.features` (no validation or test interaction). A training-period
slate's own future is in those periods (its target and later positives), so its features leave
its user out (`cf_stats.OwnCounts`): the counts are those of every other user. Validation and
test slates need no correction, since their users' training interactions all precede them. The
degree normalisation of the co-occurrence keeps the full counts (a user moves it by a few
pairs in thousands).

Features [N, K, F], in `NAMES` order (NaN where the data lacks a field, e.g. no release year):
the legacy ranker's score, slot and score gap to the top; popularity over the training periods
and over their last `recent_days`; the smoothed mean rating; the CF teacher's co-occurrence,
transition and genre-match features and the raw co-watch count with the recent history; item age
at the slate's time; the user's history length, gender, age and occupation; and slate-relative
z-scores of the main signals (a tree cannot compare candidates of one slate otherwise).
"""

import numpy as np
from absl import logging

from gr2_jax.data import artifacts
from gr2_jax.teachers import cf
from gr2_jax.teachers import cf_stats

NAMES = ("legacy_score", "legacy_slot", "legacy_gap", "popularity", "recent_popularity",
         "mean_rating", "cooc", "transition", "genre", "cowatched", "item_age",
         "history_length", "user_gender", "user_age", "user_occupation",
         "cooc_z", "transition_z", "popularity_z", "legacy_score_z")
CATEGORICAL = ("user_gender", "user_occupation")
_SECONDS_PER_YEAR = 365.25 * 86400
_RATING_PRIOR = 5.0  # pseudo-ratings at the global mean in the smoothed mean rating


def _keyed_sums(keys, values):
  uniq, inv = np.unique(keys, return_inverse=True)
  return uniq, np.bincount(inv, weights=values).astype(np.float32)


def _user_attributes(users, num_users):
  """[U, 3] float: gender (0 F / 1 M), age, occupation; NaN where absent."""
  out = np.full((num_users, 3), np.nan, np.float32)
  for u in users:
    g = u.get("gender")
    if g in ("F", "M"):
      out[u["id"], 0] = float(g == "M")
    for j, key in ((1, "age"), (2, "occupation")):
      try:
        out[u["id"], j] = float(u.get(key))
      except (TypeError, ValueError):
        pass
  return out


class FeatureBuilder:
  """Features of slates from one data artifact's training periods."""

  def __init__(self, data_dir, cf_config, recent_days=7, window=5):
    if recent_days <= 0:
      raise ValueError(f"rankers.recent_days must be > 0, got {recent_days}")
    inter = artifacts.load_interactions(data_dir)
    items = artifacts.load_items(data_dir)
    n = self.num_items = len(items)
    self.cf_config = cf_config
    self.stats = cf_stats.load_stats(data_dir, window)
    self.own = cf_stats.OwnCounts(inter, n, window)
    train = artifacts.training_mask(inter)
    ts = inter["timestamp"]
    recent = train & (ts >= ts[train].max() - recent_days * 86400)
    user, item = inter["user"].astype(np.int64), inter["item"].astype(np.int64)
    self.recent_pop = np.bincount(item[recent], minlength=n).astype(np.float32)
    self.own_recent = _keyed_sums(user[recent] * n + item[recent], np.ones(recent.sum()))
    rating = inter["rating"].astype(np.float64)
    self.rating_sum = np.bincount(item[train], weights=rating[train], minlength=n)
    self.global_rating = float(rating[train].mean()) if train.any() else 0.0
    self.own_rating = _keyed_sums(user[train] * n + item[train], rating[train])
    self.item_year = np.array([np.nan if it.get("year") in (None, "") else float(it["year"])
                               for it in items], np.float32)
    users = artifacts.load_users(data_dir)
    num_users = max(int(inter["user"].max()) + 1, len(users))
    self.user_attrs = _user_attributes(users, num_users)

  def __call__(self, slates, leave_user_out):
    """float32 [N, K, F] features of `slates` (a `slates.load_split` dict)."""
    slate = np.asarray(slates["slate"], np.int64)
    history = np.asarray(slates["history"])
    user = np.asarray(slates["user"], np.int64)
    n_rows, k = slate.shape
    if k < 2:
      raise ValueError(f"slates need at least 2 candidates, got {k}")
    loo = user if leave_user_out else np.full(n_rows, -1)
    u2 = loo[:, None]
    f = cf.features(self.stats, history, slate, self.cf_config,
                    self.own if leave_user_out else None, loo)
    n = self.num_items
    recent_pop = self.recent_pop[slate] - cf_stats.lookup_counts(
        self.own_recent, np.maximum(u2, 0) * n + slate, np.broadcast_to(u2, slate.shape))
    own_count = self.own.popularity(u2, slate) if leave_user_out else 0.0
    own_sum = (cf_stats.lookup_counts(self.own_rating, np.maximum(u2, 0) * n + slate,
                                          np.broadcast_to(u2, slate.shape))
               if leave_user_out else 0.0)
    count = self.stats.popularity[slate] - own_count
    mean_rating = ((self.rating_sum[slate] - own_sum + _RATING_PRIOR * self.global_rating)
                   / (count + _RATING_PRIOR))
    cowatched = np.log1p(f["cooc_count"])
    year = 1970.0 + np.asarray(slates["timestamp"], np.float64) / _SECONDS_PER_YEAR
    item_age = year[:, None] - self.item_year[slate]
    hist_len = np.log1p((history >= 0).sum(1)).astype(np.float32)
    attrs = self.user_attrs[np.clip(user, 0, len(self.user_attrs) - 1)]
    score = np.asarray(slates["slate_scores"], np.float32)
    cols = {
        "legacy_score": score,
        "legacy_slot": np.broadcast_to(np.arange(k, dtype=np.float32), slate.shape),
        "legacy_gap": score - score[:, :1],
        "popularity": f["popularity"],
        "recent_popularity": np.log1p(recent_pop),
        "mean_rating": mean_rating,
        "cooc": f["cooc"], "transition": f["transition"], "genre": f["genre"],
        "cowatched": cowatched,
        "item_age": item_age,
        "history_length": np.broadcast_to(hist_len[:, None], slate.shape),
        "user_gender": np.broadcast_to(attrs[:, :1], slate.shape),
        "user_age": np.broadcast_to(attrs[:, 1:2], slate.shape),
        "user_occupation": np.broadcast_to(attrs[:, 2:3], slate.shape),
    }
    for name in ("cooc", "transition", "popularity", "legacy_score"):
      cols[name + "_z"] = cf.standardize(cols[name])
    empty = int(((history >= 0).sum(1) == 0).sum())
    if empty:
      logging.warning("[rankers] %d of %d slates have an empty history: their history "
                      "features are 0", empty, n_rows)
    return np.stack([np.asarray(cols[name], np.float32) for name in NAMES], axis=-1)


def labels(slates, kind):
  """[N, K] float32 relevance for training: "target" (one-hot), "labels" (every positive) or
  "grades" (0 / 1 / 2: liked positives 2)."""
  if kind == "target":
    out = np.zeros(slates["slate"].shape, np.float32)
    rows = np.flatnonzero(slates["target_index"] >= 0)
    out[rows, slates["target_index"][rows]] = 1.0
    return out
  if kind in ("labels", "grades"):
    return np.asarray(slates[kind], np.float32)
  raise ValueError(f"rankers.label must be target, labels or grades, got {kind!r}")


def constant_features(x):
  """Names of the features constant over every (slate, candidate) of x (NaN ignored)."""
  flat = x.reshape(-1, x.shape[-1])
  out = []
  for j, name in enumerate(NAMES):
    col = flat[:, j]
    col = col[np.isfinite(col)]
    if col.size == 0 or col.min() == col.max():
      out.append(name)
  return out
