"""Ranking metrics over slates, with bootstrap confidence intervals.

Ranks are 0-based (0 = first). Per-example metric arrays are averaged by `bootstrap_ci`;
`paired_bootstrap` compares two rankings of the same slates (same resampled examples for both).
"""

import numpy as np


def recall_at_k(ranks, k):
  """Hit of the single target in the top k: 1.0 / 0.0 per example."""
  return (np.asarray(ranks) < k).astype(np.float64)


def ndcg_at_k(ranks, k):
  """NDCG@k with one relevant item: 1 / log2(rank + 2) inside the top k (IDCG = 1)."""
  ranks = np.asarray(ranks)
  return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def target_ranks(order, target_index):
  """Rank of the target in each output order.

  order: int [N, K], the slate positions in output order; target_index: int [N], the target's
  position in the slate. Returns int [N].
  """
  order = np.asarray(order)
  return np.argmax(order == np.asarray(target_index)[:, None], axis=1)


def _discounts(k):
  return 1.0 / np.log2(np.arange(k) + 2.0)


def multi_recall_at_k(ordered_labels, k):
  """Share of positives in the top k, over min(k, #positives); NaN without positives."""
  lab = np.asarray(ordered_labels, np.float64)
  npos = lab.sum(1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(npos > 0, lab[:, :k].sum(1) / np.minimum(npos, k), np.nan)


def graded_ndcg_at_k(ordered_grades, k):
  """NDCG@k with gains 2^g - 1 (g = 0 irrelevant); NaN without any relevant item.

  With binary grades it is the multi-positive NDCG."""
  g = np.asarray(ordered_grades, np.float64)
  gains = 2.0 ** g - 1.0
  k = min(k, g.shape[1])
  dcg = (gains[:, :k] * _discounts(k)).sum(1)
  ideal = (-np.sort(-gains, axis=1)[:, :k] * _discounts(k)).sum(1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(ideal > 0, dcg / ideal, np.nan)


def multi_ndcg_at_k(ordered_labels, k):
  """Binary multi-positive NDCG@k."""
  return graded_ndcg_at_k((np.asarray(ordered_labels) > 0).astype(np.float64), k)


def auc(ordered_labels):
  """Fraction of (positive, negative) pairs with the positive first; NaN without both."""
  lab = np.asarray(ordered_labels) > 0
  neg_after = np.cumsum((~lab)[:, ::-1], axis=1)[:, ::-1]  # negatives at or after each slot
  correct = (lab * neg_after).sum(1)
  pairs = lab.sum(1) * (~lab).sum(1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(pairs > 0, correct / np.maximum(pairs, 1), np.nan)


def _bootstrap_means(values_list, n_boot, seed, chunk=200):
  """Means of each array in values_list over the same n_boot resamples: [len, n_boot]."""
  n = len(values_list[0])
  rng = np.random.default_rng(seed)
  out = np.empty((len(values_list), n_boot))
  for s in range(0, n_boot, chunk):
    idx = rng.integers(0, n, size=(min(chunk, n_boot - s), n))
    for j, v in enumerate(values_list):
      out[j, s:s + idx.shape[0]] = v[idx].mean(1)
  return out


def bootstrap_ci(values, n_boot=1000, alpha=0.05, seed=0):
  """Mean of per-example values (NaNs dropped) with a percentile bootstrap interval."""
  v = np.asarray(values, np.float64)
  v = v[~np.isnan(v)]
  if v.size == 0:
    return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
  means = _bootstrap_means([v], n_boot, seed)[0]
  lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
  return {"mean": float(v.mean()), "lo": float(lo), "hi": float(hi), "n": int(v.size)}


def paired_bootstrap(a, b, n_boot=1000, alpha=0.05, seed=0):
  """Difference mean(a) - mean(b) and relative lift mean(a) / mean(b) - 1 of two metric arrays
  on the same examples, each with a paired percentile bootstrap interval."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b.shape}")
  keep = ~(np.isnan(a) | np.isnan(b))
  a, b = a[keep], b[keep]
  if a.size == 0:
    nan = float("nan")
    return {"diff": nan, "diff_lo": nan, "diff_hi": nan, "lift": nan, "lift_lo": nan,
            "lift_hi": nan, "n": 0}
  ma, mb = _bootstrap_means([a, b], n_boot, seed)
  q = [alpha / 2, 1 - alpha / 2]
  diff_lo, diff_hi = np.quantile(ma - mb, q)
  with np.errstate(invalid="ignore", divide="ignore"):
    lifts = ma / mb - 1.0
    lift = a.mean() / b.mean() - 1.0 if b.mean() != 0 else float("nan")
  lifts = lifts[np.isfinite(lifts)]  # resamples whose reference mean is 0 have no lift
  lift_lo, lift_hi = np.quantile(lifts, q) if lifts.size else (np.nan, np.nan)
  return {"diff": float(a.mean() - b.mean()), "diff_lo": float(diff_lo),
          "diff_hi": float(diff_hi), "lift": float(lift), "lift_lo": float(lift_lo),
          "lift_hi": float(lift_hi), "n": int(a.size)}
