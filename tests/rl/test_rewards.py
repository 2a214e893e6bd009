"""Rewards: every branch against hand-computed values, metrics against the eval reference."""

import functools
import math

import jax
import numpy as np
import pytest

from gr2_jax.errors import UserError
from gr2_jax.eval import metrics
from gr2_jax.rl import rewards
from gr2_jax.rl.registry import REWARDS

K = 5
IDENTITY = [0, 1, 2, 3, 4]
# (name, target_index, order, valid, R_rank)
SINGLE_CASES = [
    ("moved up 3 -> 1", 3, [0, 3, 1, 2, 4], True, 0.4),
    ("moved down 1 -> 3", 1, [0, 2, 3, 1, 4], True, -0.4),
    ("first stays first", 0, [0, 2, 1, 3, 4], True, 0.0),
    ("stays at position 3 (identity)", 3, IDENTITY, True, 0.0),
    ("stays at 3, others moved", 3, [1, 0, 2, 3, 4], True, 0.0),
    ("first moved down to 2", 0, [1, 2, 0, 3, 4], True, -0.4),
    ("last moved to first", 4, [4, 0, 1, 2, 3], True, 0.8),
    ("invalid output", 2, [2, 2, 9, -1, 0], False, 0.0),
]


def _jit(fn, **params):
  """fn jitted with its parameters as static config (also checks that it traces)."""
  return jax.jit(functools.partial(fn, **params))


def _single_batch():
  target = np.array([c[1] for c in SINGLE_CASES])
  order = np.array([c[2] for c in SINGLE_CASES])
  valid = np.array([c[3] for c in SINGLE_CASES])
  return valid, order, target


def test_rank_promotion_every_branch():
  valid, order, target = _single_batch()
  out = _jit(rewards.rank_promotion)(valid, order, target)
  # Bonus 0.2 only for "moved up" or "first stays first"; invalid -> -1.
  expected = [0.6, -0.4, 0.2, 0.0, 0.0, -0.4, 1.0, -1.0]
  np.testing.assert_allclose(out["total"], expected, atol=1e-6)
  np.testing.assert_allclose(out["rank"], [c[4] for c in SINGLE_CASES], atol=1e-6)
  np.testing.assert_allclose(out["format"], [0.2, 0, 0.2, 0, 0, 0, 0.2, 0], atol=1e-6)
  np.testing.assert_array_equal(out["valid"], valid.astype(np.float32))
  assert np.all(out["has_signal"])


def test_rank_promotion_parameters():
  valid, order, target = _single_batch()
  out = _jit(rewards.rank_promotion, alpha=0.5, invalid_penalty=-2.0)(valid, order, target)
  np.testing.assert_allclose(out["total"], [0.9, -0.4, 0.5, 0.0, 0.0, -0.4, 1.3, -2.0], atol=1e-6)


def test_naive_pays_the_copy_of_the_input_order():
  valid, order, target = _single_batch()
  out = _jit(rewards.naive)(valid, order, target)
  np.testing.assert_allclose(out["total"], [0.6, -0.2, 0.2, 0.2, 0.2, -0.2, 1.0, -1.0], atol=1e-6)


def test_rewards_jit_with_params_as_config():
  valid, order, target = _single_batch()
  fn = jax.jit(functools.partial(REWARDS.get("rank_promotion"), alpha=0.3))
  out = fn(valid, order, target)
  np.testing.assert_allclose(out["total"], [0.7, -0.4, 0.3, 0.0, 0.0, -0.4, 1.1, -1.0], atol=1e-6)


def test_missing_input_is_a_user_error():
  valid, order, _ = _single_batch()
  with pytest.raises(UserError, match="needs `target_index`"):
    rewards.rank_promotion(valid, order)
  with pytest.raises(UserError, match="needs `grades`"):
    rewards.auc(valid, order)


# Slate of 4 with positives at legacy positions 0 and 2: the legacy order's AUC = 3/4.
AUC_GRADES = [1, 0, 1, 0]


def test_auc_every_branch_of_eq7():
  # Eq. 7: R = AUC(o) + alpha * Omega, except a copy of a suboptimal shown order: alpha * Omega;
  # an invalid output -1. Values by hand, the shown order being the legacy order here.
  a = 0.2
  cases = [  # (grades, order, valid, total, lazy)
      (AUC_GRADES, [0, 1, 2, 3], True, a, True),  # copy of a suboptimal order: the bonus only
      (AUC_GRADES, [0, 2, 1, 3], True, 1 + a, False),  # optimal
      (AUC_GRADES, [2, 0, 3, 1], True, 1 + a, False),  # optimal, other order
      (AUC_GRADES, [1, 0, 2, 3], True, 0.5 + a, False),  # [0,1,1,0]: 2 of 4 pairs, below input
      (AUC_GRADES, [1, 3, 0, 2], True, 0 + a, False),  # fully reversed: AUC 0, still valid
      ([1, 1, 0, 0], [0, 1, 2, 3], True, 1 + a, False),  # copy of an already optimal order
      ([0, 0, 0, 1], [0, 1, 3, 2], True, 1 / 3 + a, False),  # [0,0,1,0]: 1 of 3
      ([0, 0, 0, 0], [1, 0, 2, 3], True, a, False),  # no positive: no ranking credit
      ([1, 1, 1, 1], [1, 0, 2, 3], True, a, False),  # no negative
      (AUC_GRADES, [7, -1, 0, 0], False, -1.0, False),  # invalid
  ]
  grades = np.array([c[0] for c in cases])
  order = np.array([c[1] for c in cases])
  valid = np.array([c[2] for c in cases])
  out = _jit(rewards.auc)(valid, order, grades=grades)
  np.testing.assert_allclose(out["total"], [c[3] for c in cases], atol=1e-6)
  np.testing.assert_allclose(out["rank"], [0, 1, 1, 0.5, 0, 1, 1 / 3, 0, 0, 0], atol=1e-6)
  np.testing.assert_array_equal(out["has_signal"], [1, 1, 1, 1, 1, 1, 1, 0, 0, 1])
  np.testing.assert_array_equal(out["lazy_identity"], [c[4] for c in cases])
  np.testing.assert_allclose(out["input_auc"][:7], [0.75] * 5 + [1.0, 0.0], atol=1e-6)
  out = _jit(rewards.auc, alpha=0.5, invalid_penalty=-0.5)(valid, order, grades=grades)
  np.testing.assert_allclose(
      out["total"], [c[3] + 0.3 if c[2] else -0.5 for c in cases], atol=1e-6)


def test_eq7_reads_the_shown_order():
  # The same legacy grades shown in two orders: copying what was shown is the lazy answer,
  # unless the shown order is optimal; the legacy identity is an ordinary answer then.
  grades = np.array([AUC_GRADES] * 4)
  shown = np.array([[2, 3, 0, 1], [2, 3, 0, 1], [0, 2, 1, 3], [0, 2, 1, 3]])
  # Shown [2,3,0,1] has grades [1,0,1,0]: AUC 3/4; shown [0,2,1,3] has [1,1,0,0]: optimal.
  order = np.array([[2, 3, 0, 1], [0, 1, 2, 3], [0, 2, 1, 3], [0, 1, 2, 3]])
  out = _jit(rewards.auc)(np.ones(4, bool), order, grades=grades, shown=shown)
  np.testing.assert_allclose(out["total"], [0.2, 0.75 + 0.2, 1.2, 0.75 + 0.2], atol=1e-6)
  np.testing.assert_array_equal(out["lazy_identity"], [1, 0, 0, 0])
  np.testing.assert_allclose(out["input_auc"], [0.75, 0.75, 1.0, 1.0], atol=1e-6)


def test_graded_ndcg_every_branch():
  log2 = math.log2
  grades = [0, 2, 1, 0]  # gains [0, 3, 1, 0]
  ideal = 3 + 1 / log2(3)
  cases = [  # (grades, order, valid, credit)
      (grades, [0, 1, 2, 3], True, 0.0),  # identity of a suboptimal order
      (grades, [1, 2, 0, 3], True, 1.0),  # ideal
      (grades, [2, 1, 0, 3], True, (1 + 3 / log2(3)) / ideal),
      (grades, [0, 3, 2, 1], True, (1 / 2 + 3 / log2(5)) / ideal),
      ([2, 1, 0, 0], [0, 1, 2, 3], True, 1.0),  # identity of the ideal order
      ([2, 2, 1, 1], [3, 2, 1, 0], True, 0.0),  # no negative: no signal
      ([0, 0, 0, 0], [3, 2, 1, 0], True, 0.0),  # no positive
      (grades, [1, 1, 1, 1], False, 0.0),  # invalid
  ]
  g = np.array([c[0] for c in cases])
  order = np.array([c[1] for c in cases])
  valid = np.array([c[2] for c in cases])
  credit = np.array([c[3] for c in cases])
  out = _jit(rewards.graded_ndcg, alpha=0.0)(valid, order, grades=g)
  np.testing.assert_allclose(out["total"], np.where(valid, credit, -1.0), atol=1e-6)
  np.testing.assert_array_equal(out["has_signal"], [1, 1, 1, 1, 1, 0, 0, 1])
  np.testing.assert_allclose(out["input_ndcg"][0], (3 / log2(3) + 1 / 2) / ideal, rtol=1e-6)
  # Eq. 7's format bonus: every valid output, the lazy copy of row 0 included (its only reward).
  out = _jit(rewards.graded_ndcg, alpha=0.1)(valid, order, grades=g)
  np.testing.assert_allclose(out["total"], np.where(valid, credit + 0.1, -1.0), atol=1e-6)


def test_metrics_match_the_eval_reference_on_random_permutations():
  rng = np.random.default_rng(0)
  n, k = 64, 10
  grades = rng.integers(0, 3, size=(n, k))
  grades[0] = 0  # one slate without positives
  order = np.argsort(rng.random((n, k)), axis=1)
  valid = np.ones(n, bool)
  ordered = np.take_along_axis(grades, order, 1)
  signal = (grades > 0).any(1) & (grades == 0).any(1)
  assert 0 < signal.sum() < n
  ref_auc = np.where(signal, np.nan_to_num(metrics.auc(ordered)), 0.0)
  ref_ndcg = np.where(signal, np.nan_to_num(metrics.graded_ndcg_at_k(ordered, k)), 0.0)
  got_auc = _jit(rewards.auc, alpha=0.0)(valid, order, grades=grades)
  got_ndcg = _jit(rewards.graded_ndcg, alpha=0.0)(valid, order, grades=grades)
  np.testing.assert_array_equal(got_auc["has_signal"], signal)
  np.testing.assert_allclose(got_auc["total"], ref_auc, atol=1e-5)
  np.testing.assert_allclose(got_ndcg["total"], ref_ndcg, rtol=1e-5, atol=1e-6)
