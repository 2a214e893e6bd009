"""Verifiable re-ranking rewards, vectorised over a batch of N rollouts of slates of K items.

Every reward has the signature
`fn(valid, order, target_index=None, grades=None, shown=None, **params)`, all in *legacy* slate
positions (the incoming order of the upstream ranker, which a display shuffle does not change):
  valid: bool [N], the output parsed into a valid permutation of exactly the slate (Omega).
  order: int [N, K], legacy slate positions in output order (order[n, 0] is ranked first);
    arbitrary where not valid.
  target_index: int [N], legacy position of the single positive (rank_promotion, naive); -1 or
    out of range = the target is not in the slate.
  grades: int [N, K] by legacy position, 0 = negative; binary labels are grades in {0, 1}
    (auc, graded_ndcg).
  shown: optional int [N, K], the order the slate was shown in (shown position j held legacy
    position shown[n, j]); default the legacy order. Only the conditional rule of auc and
    graded_ndcg reads it: copying the order one was shown is the lazy answer.
So the reward of an output depends on the output and the slate, not on the luck of a shuffle.
Each returns a dict of float32 / bool [N] components, always with "total" (the scalar reward),
"valid" and "has_signal" (False where the slate cannot rank: the driver drops such groups).
Ranks are 0-based. An invalid output earns `invalid_penalty` whatever the slate, never a
partial parse. `alpha` is the format bonus (R_fmt = Omega), paid under each reward's condition.
"""

import jax.numpy as jnp

from gr2_jax.errors import UserError
from gr2_jax.rl.registry import REWARDS

# Tolerance for "the shown order is already optimal" (metric == 1 up to float error).
_OPTIMAL_TOL = 1e-6


def _need(name, value, reward):
  if value is None:
    raise UserError(f"reward {reward!r} needs `{name}` in the batch; pass it or pick a reward "
                    "that fits the labels")
  return jnp.asarray(value)


def _safe_order(order):
  """Order clipped into the slate, so gathers on invalid outputs stay in bounds."""
  order = jnp.asarray(order)
  return jnp.clip(order, 0, order.shape[-1] - 1)


def is_identity(order):
  """bool [N]: the output order equals the input order."""
  order = jnp.asarray(order)
  return jnp.all(order == jnp.arange(order.shape[-1]), axis=-1)


def copies_shown(order, shown=None):
  """bool [N]: the output lists the slate exactly as it was shown."""
  if shown is None:
    return is_identity(order)
  return jnp.all(jnp.asarray(order) == jnp.asarray(shown), axis=-1)


def output_rank(order, target_index):
  """int [N]: 0-based rank of the slate position `target_index` in the output order."""
  return jnp.argmax(jnp.asarray(order) == jnp.asarray(target_index)[:, None], axis=-1)


def _rank_delta(valid, order, target_index, reward):
  valid = jnp.asarray(valid, bool)
  target = _need("target_index", target_index, reward)
  order = jnp.asarray(order)
  k = order.shape[-1]
  has_signal = (target >= 0) & (target < k)
  rank_out = output_rank(order, target)
  delta = (target - rank_out).astype(jnp.float32) / k
  return valid, target, rank_out, has_signal, delta


def _components(valid, has_signal, rank, fmt, invalid_penalty):
  """The parts every reward returns: ranking credit, format bonus, and their total (the penalty
  for invalid outputs)."""
  return {
      "rank": rank,
      "format": fmt,
      "valid": valid.astype(jnp.float32),
      "has_signal": has_signal,
      "total": jnp.where(valid, rank + fmt, invalid_penalty).astype(jnp.float32),
  }


@REWARDS.register("rank_promotion")
def rank_promotion(valid, order, target_index=None, grades=None, shown=None, *, alpha=0.2,
                   invalid_penalty=-1.0):
  """Paper 1: R_rank = (rank_in(x*) - rank_out(x*)) / K with the conditional format reward.

  rank_in is the target's legacy rank. The format bonus alpha is paid only when the target
  moved up or was first and stayed first, so copying the incoming order earns nothing beyond
  R_rank = 0.
  """
  del grades, shown
  valid, target, rank_out, has_signal, delta = _rank_delta(valid, order, target_index,
                                                           "rank_promotion")
  credit = valid & has_signal
  bonus = credit & ((delta > 0) | ((target == 0) & (rank_out == 0)))
  rank = jnp.where(credit, delta, 0.0)
  fmt = alpha * bonus.astype(jnp.float32)
  return _components(valid, has_signal, rank, fmt, invalid_penalty)


@REWARDS.register("naive")
def naive(valid, order, target_index=None, grades=None, shown=None, *, alpha=0.2,
          invalid_penalty=-1.0):
  """R_rank + alpha * Omega, unconditionally: the hackable form, kept for the ablation."""
  del grades, shown
  valid, _, _, has_signal, delta = _rank_delta(valid, order, target_index, "naive")
  rank = jnp.where(valid & has_signal, delta, 0.0)
  fmt = alpha * valid.astype(jnp.float32)
  return _components(valid, has_signal, rank, fmt, invalid_penalty)


def auc_of(ordered_grades):
  """float32 [N]: fraction of (positive, negative) pairs with the positive first; 0 without both."""
  pos = jnp.asarray(ordered_grades) > 0
  neg = ~pos
  neg_after = jnp.cumsum(neg[:, ::-1], axis=-1)[:, ::-1]  # negatives at or after each slot
  correct = jnp.sum(jnp.where(pos, neg_after, 0), axis=-1)
  pairs = jnp.sum(pos, axis=-1) * jnp.sum(neg, axis=-1)
  return jnp.where(pairs > 0, correct / jnp.maximum(pairs, 1), 0.0).astype(jnp.float32)


def graded_ndcg_of(ordered_grades):
  """float32 [N]: NDCG over the full slate with gains 2^g - 1; 0 without a relevant item."""
  g = jnp.asarray(ordered_grades, jnp.float32)
  gains = 2.0 ** g - 1.0
  disc = 1.0 / jnp.log2(jnp.arange(g.shape[-1], dtype=jnp.float32) + 2.0)
  dcg = jnp.sum(gains * disc, axis=-1)
  ideal = jnp.sum(-jnp.sort(-gains, axis=-1) * disc, axis=-1)
  return jnp.where(ideal > 0, dcg / jnp.where(ideal > 0, ideal, 1.0), 0.0)


def _conditional_metric_reward(metric_fn, key, valid, order, grades, shown, alpha,
                               invalid_penalty, reward):
  """The technical report's conditional reward (its Eq. 7).

  R = R_rank + alpha * R_fmt, except for an output that copies the shown order when that order
  is not already optimal: R = alpha * R_fmt. R_fmt = Omega, R_rank the metric of the output,
  paid only when Omega = 1; an invalid output gets `invalid_penalty`.
  """
  valid = jnp.asarray(valid, bool)
  grades = _need("grades", grades, reward)
  ordered = jnp.take_along_axis(grades, _safe_order(order), axis=-1)
  shown_order = (jnp.broadcast_to(jnp.arange(grades.shape[-1]), grades.shape) if shown is None
                 else jnp.asarray(shown))
  has_signal = jnp.any(grades > 0, axis=-1) & jnp.any(grades <= 0, axis=-1)
  out_metric = metric_fn(ordered)
  shown_metric = metric_fn(jnp.take_along_axis(grades, shown_order, axis=-1))
  lazy = copies_shown(order, shown_order) & (shown_metric < 1.0 - _OPTIMAL_TOL)
  rank = jnp.where(valid & has_signal & ~lazy, out_metric, 0.0)
  fmt = alpha * valid.astype(jnp.float32)
  return {
      key: jnp.where(valid & has_signal, out_metric, 0.0),
      "input_" + key: jnp.where(has_signal, shown_metric, 0.0),
      "lazy_identity": valid & has_signal & lazy,
      **_components(valid, has_signal, rank, fmt, invalid_penalty),
  }


@REWARDS.register("auc")
def auc(valid, order, target_index=None, grades=None, shown=None, *, alpha=0.2,
        invalid_penalty=-1.0):
  """Technical report: AUC of the output order under the conditional rule (Eq. 7).

  A slate without a positive or a negative has has_signal False (and no ranking credit).
  """
  del target_index
  return _conditional_metric_reward(auc_of, "auc", valid, order, grades, shown, alpha,
                                    invalid_penalty, "auc")


@REWARDS.register("graded_ndcg")
def graded_ndcg(valid, order, target_index=None, grades=None, shown=None, *, alpha=0.2,
                invalid_penalty=-1.0):
  """Technical report: graded NDCG (gains 2^g - 1, full slate) under the rule of `auc`."""
  del target_index
  return _conditional_metric_reward(graded_ndcg_of, "ndcg", valid, order, grades, shown, alpha,
                                    invalid_penalty, "graded_ndcg")
