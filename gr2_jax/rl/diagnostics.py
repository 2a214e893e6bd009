"""Re-ranking diagnostics of a batch of rollouts (host-side numpy, for logging).

They watch for the position-bias hacks: copying the incoming order (identity rate, Kendall tau
near 1) or always promoting the same input position (histogram of where the top item sat).
Order statistics use valid outputs only; their counts are reported alongside. A mean over an
empty set is NaN.
"""

import numpy as np


def kendall_tau(order):
  """float64 [N]: Kendall tau between the input order (identity) and each output order.

  order: int [N, K] permutations of 0..K-1; 1 for the identity, -1 for the reversed order.
  """
  order = np.asarray(order)
  k = order.shape[-1]
  if k < 2:
    return np.ones(order.shape[0])
  # Pair (i, j), i < j in the output, is concordant iff order[i] < order[j].
  diff = np.sign(order[:, None, :] - order[:, :, None])  # [N, K(i), K(j)]: sign(o_j - o_i)
  upper = np.triu(np.ones((k, k), bool), 1)
  return (diff * upper).sum((1, 2)) / (k * (k - 1) / 2)


def _mean(x):
  return float(np.mean(x)) if np.size(x) else float("nan")


def rerank_diagnostics(valid, order, lengths=None, token_logps=None, token_mask=None,
                       token_entropies=None):
  """Dict of scalar diagnostics (and one [K] histogram).

  valid: bool [N]; order: int [N, K] slate positions in output order (ignored where invalid);
  lengths: optional int [N] response lengths in tokens.
  token_entropies: optional float [N, T] entropy of the distribution each token was sampled
    from (`SampleOutput.entropies`); `entropy` is their mean over token_mask.
  token_logps: optional float [N, T] rollout log-probs of the sampled tokens; `neg_logp` is
    -mean log p over token_mask, a Monte Carlo estimate of the entropy when nothing truncated
    the sampling distribution (under a constraint or top-k / top-p it exceeds it by the mean
    -log of the allowed mass). Without token_entropies `entropy` falls back to it.
  token_mask: [N, T] tokens that count, for both (default all).
  """
  valid = np.asarray(valid, bool)
  order = np.asarray(order)
  k = order.shape[-1]
  ok = order[valid]
  out = {
      "num_rollouts": int(valid.size),
      "num_valid": int(valid.sum()),
      "valid_rate": _mean(valid),
      "identity_rate": _mean(np.all(ok == np.arange(k), axis=-1)),
      "kendall_tau": _mean(kendall_tau(ok)),
      # Counts over valid outputs of the input position of the item ranked first.
      "top_input_position_hist": np.bincount(ok[:, 0], minlength=k)[:k] if len(ok)
                                 else np.zeros(k, np.int64),
  }
  if lengths is not None:
    out["mean_response_length"] = _mean(np.asarray(lengths, np.float64))

  def masked(x):
    x = np.asarray(x, np.float64)
    return x[np.ones(x.shape, bool) if token_mask is None else np.asarray(token_mask, bool)]

  if token_logps is not None:
    out["neg_logp"] = -_mean(masked(token_logps))
    out["entropy"] = out["neg_logp"]
  if token_entropies is not None:
    out["entropy"] = _mean(masked(token_entropies))
  return out
