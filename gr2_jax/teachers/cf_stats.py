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


def compute_stats(interactions, items, window=5):
  """Statistics from the interactions of the training periods (`artifacts.training_mask`).

  Each user's training interactions are taken in (timestamp, item) order; two items co-occur
  when at most `window` steps apart, and a transition counts directly consecutive items.
  """
  if window < 1:
    raise ValueError(f"co-occurrence window must be >= 1, got {window}")
  n = len(items)
  keep = artifacts.training_mask(interactions)
  user = interactions["user"][keep]
  item = interactions["item"][keep].astype(np.int64)
  order = np.lexsort((item, interactions["timestamp"][keep], user))
  user, item = user[order], item[order]
  cooc = np.zeros((n, n), np.float32)
  transitions = np.zeros((n, n), np.float32)
  for d in range(1, window + 1):
    same = user[d:] == user[:-d]
    a, b = item[:-d][same], item[d:][same]
    counts = _pair_counts(a, b, n)
    cooc += counts + counts.T
    if d == 1:
      transitions += counts
  np.fill_diagonal(cooc, 0.0)  # a re-watch is not a co-occurrence
  item_genres, genres = genre_matrix(items)
  return CFStats(popularity=np.bincount(item, minlength=n).astype(np.float32), cooc=cooc,
                 transitions=transitions, item_genres=item_genres, genres=genres, window=window)
