"""Collaborative-filtering statistics of the training periods (legacy + train) only.

Dense [N, N] count matrices: MovieLens-1M has ~3.7k items, so each is ~55 MB in float32.
"""

import dataclasses
import functools

import numpy as np

from gr2_jax.data import artifacts


@dataclasses.dataclass(frozen=True)
class CFStats:
  popularity: np.ndarray  # float32 [N]: interactions per item
  cooc: np.ndarray  # float32 [N, N], symmetric: pairs within `window` steps of one sequence
  transitions: np.ndarray  # float32 [N, N]: [a, b] = times b directly followed a
  item_genres: np.ndarray  # float32 [N, G] multi-hot
  genres: tuple  # G genre names
  window: int

  @property
  def num_items(self):
    return len(self.popularity)

  @functools.cached_property
  def cooc_degree(self):
    """Co-occurrence row sums [N] (cached: the matrices are large)."""
    return self.cooc.sum(1)

  @functools.cached_property
  def transitions_out(self):
    """Transitions leaving each item [N]."""
    return self.transitions.sum(1)


@functools.lru_cache(maxsize=2)
def load_stats(data_dir, window=5):
  """`compute_stats` of a data artifact folder, once per (folder, window) in a process: the CF
  teacher and the prompt's evidence field read the same matrices."""
  return compute_stats(artifacts.load_interactions(data_dir), artifacts.load_items(data_dir),
                       window=window)


def genre_matrix(items):
  """Multi-hot [N, G] genres of items (ids 0..N-1) and the sorted genre names."""
  genres = tuple(sorted({g for it in items for g in it.get("genres", ())}))
  col = {g: j for j, g in enumerate(genres)}
  m = np.zeros((len(items), len(genres)), np.float32)
  for it in items:
    for g in it.get("genres", ()):
      m[it["id"], col[g]] = 1.0
  return m, genres


def _pair_counts(a, b, n):
  return np.bincount(a.astype(np.int64) * n + b, minlength=n * n).reshape(n, n)


def _training_sequences(interactions):
  """(user, item) of the training-period interactions in (user, timestamp, item) order."""
  keep = artifacts.training_mask(interactions)
  user = interactions["user"][keep].astype(np.int64)
  item = interactions["item"][keep].astype(np.int64)
  order = np.lexsort((item, interactions["timestamp"][keep], user))
  return user[order], item[order]


def _pairs(user, item, d):
  """(user, a, b) of the items `d` steps apart (a first) in one user's sequence."""
  same = user[d:] == user[:-d]
  return user[:-d][same], item[:-d][same], item[d:][same]


def compute_stats(interactions, items, window=5):
  """Statistics from the interactions of the training periods (`artifacts.training_mask`).

  Each user's training interactions are taken in (timestamp, item) order; two items co-occur
  when at most `window` steps apart, and a transition counts directly consecutive items.
  """
  if window < 1:
    raise ValueError(f"co-occurrence window must be >= 1, got {window}")
  n = len(items)
  user, item = _training_sequences(interactions)
  cooc = np.zeros((n, n), np.float32)
  transitions = np.zeros((n, n), np.float32)
  for d in range(1, window + 1):
    _, a, b = _pairs(user, item, d)
    counts = _pair_counts(a, b, n)
    cooc += counts + counts.T
    if d == 1:
      transitions += counts
  np.fill_diagonal(cooc, 0.0)  # a re-watch is not a co-occurrence
  item_genres, genres = genre_matrix(items)
  return CFStats(popularity=np.bincount(item, minlength=n).astype(np.float32), cooc=cooc,
                 transitions=transitions, item_genres=item_genres, genres=genres, window=window)


def lookup_counts(table, keys, user):
  """Values of `keys` in a (sorted unique keys, values) table, 0 where absent or user < 0."""
  uniq, counts = table
  if not len(uniq):
    return np.zeros(np.shape(keys), np.float32)
  pos = np.minimum(np.searchsorted(uniq, keys), len(uniq) - 1)
  found = (uniq[pos] == keys) & (np.asarray(user) >= 0)
  return np.where(found, counts[pos], 0).astype(np.float32)


class OwnCounts:
  """Each user's own share of the `compute_stats` counts, for leave-user-out statistics.

  A feature of a training-period example must not see the example's own future: the target
  and later positives are in the training periods, so the user's own pairs would tell the
  model which candidate comes next. Subtracting the user's own counts gives the statistics of
  every other user (validation and test examples need no such correction: their users' training
  interactions all precede them). Stored as sorted int64 keys with counts.
  """

  def __init__(self, interactions, num_items, window=5):
    n = self.n = int(num_items)
    user, item = _training_sequences(interactions)
    cooc, trans = [], []
    for d in range(1, window + 1):
      u, a, b = _pairs(user, item, d)
      keep = a != b  # the matrices' diagonal is zero
      cooc += [self._key(u[keep], a[keep], b[keep]), self._key(u[keep], b[keep], a[keep])]
      if d == 1:
        trans.append(self._key(u, a, b))
    self._cooc = np.unique(np.concatenate(cooc), return_counts=True)
    self._trans = np.unique(np.concatenate(trans), return_counts=True)
    self._pop = np.unique(user * n + item, return_counts=True)

  def _key(self, user, a, b):
    return (np.asarray(user, np.int64) * self.n + a) * self.n + b

  def cooc(self, user, a, b):
    """User `user`'s own contribution to cooc[a, b] (broadcasting; user -1 = none)."""
    user, a, b = np.broadcast_arrays(np.asarray(user), np.asarray(a), np.asarray(b))
    return lookup_counts(self._cooc, self._key(np.maximum(user, 0), a, b), user)

  def transitions(self, user, a, b):
    user, a, b = np.broadcast_arrays(np.asarray(user), np.asarray(a), np.asarray(b))
    return lookup_counts(self._trans, self._key(np.maximum(user, 0), a, b), user)

  def popularity(self, user, item):
    user, item = np.broadcast_arrays(np.asarray(user), np.asarray(item))
    return lookup_counts(self._pop, np.maximum(user, 0).astype(np.int64) * self.n + item, user)
