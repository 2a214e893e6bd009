"""Metrics against values computed by hand."""

import math

import numpy as np
import pytest

from gr2_jax.eval import metrics


def test_recall_and_ndcg_single_target():
  ranks = np.array([0, 1, 2, 5])
  np.testing.assert_array_equal(metrics.recall_at_k(ranks, 3), [1, 1, 1, 0])
  np.testing.assert_allclose(metrics.ndcg_at_k(ranks, 3), [1.0, 1 / math.log2(3), 0.5, 0.0])


def test_target_ranks_from_orders():
  order = np.array([[2, 0, 1], [0, 1, 2], [1, 2, 0]])
  np.testing.assert_array_equal(metrics.target_ranks(order, np.array([0, 2, 1])), [1, 2, 0])


def test_random_order_expectations_match_the_spec():
  # Exact expectations for a slate of 10 (GR2_SPEC): N@3 0.2131, N@5 0.2948.
  ranks = np.arange(10)
  assert metrics.ndcg_at_k(ranks, 3).mean() == pytest.approx(0.2131, abs=1e-4)
  assert metrics.ndcg_at_k(ranks, 5).mean() == pytest.approx(0.2948, abs=1e-4)
  assert metrics.recall_at_k(ranks, 3).mean() == pytest.approx(0.3)


def test_multi_positive_recall():
  labels = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]])
  np.testing.assert_allclose(metrics.multi_recall_at_k(labels, 1), [1.0, np.nan, 0.0])
  np.testing.assert_allclose(metrics.multi_recall_at_k(labels, 2), [0.5, np.nan, 0.5])
  np.testing.assert_allclose(metrics.multi_recall_at_k(labels, 3), [1.0, np.nan, 2 / 3])


def test_graded_ndcg():
  grades = np.array([[0, 2, 1], [2, 1, 0], [0, 0, 0]])
  dcg = 3 / math.log2(3) + 1 / 2
  idcg = 3 + 1 / math.log2(3)
  np.testing.assert_allclose(metrics.graded_ndcg_at_k(grades, 3), [dcg / idcg, 1.0, np.nan])
  # At k=1 only the first slot counts, against the best single gain.
  np.testing.assert_allclose(metrics.graded_ndcg_at_k(grades, 1), [0.0, 1.0, np.nan])


def test_multi_ndcg_is_binary_graded():
  labels = np.array([[0, 1, 1]])
  dcg = 1 / math.log2(3) + 1 / 2
  idcg = 1 + 1 / math.log2(3)
  np.testing.assert_allclose(metrics.multi_ndcg_at_k(labels, 3), [dcg / idcg])


def test_auc():
  labels = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
  np.testing.assert_allclose(metrics.auc(labels), [0.75, 2 / 3, 1.0, 0.0, np.nan])


def test_bootstrap_ci_constant_and_nan():
  ci = metrics.bootstrap_ci(np.array([0.5] * 20 + [np.nan]))
  assert ci == {"mean": 0.5, "lo": 0.5, "hi": 0.5, "n": 20}
  assert metrics.bootstrap_ci(np.array([np.nan]))["n"] == 0


def test_bootstrap_ci_width_matches_normal_approximation():
  rng = np.random.default_rng(1)
  v = (rng.random(4000) < 0.3).astype(float)
  ci = metrics.bootstrap_ci(v, n_boot=2000, seed=3)
  half = 1.96 * math.sqrt(v.mean() * (1 - v.mean()) / v.size)
  assert ci["lo"] < v.mean() < ci["hi"]
  assert (ci["hi"] - ci["lo"]) / 2 == pytest.approx(half, rel=0.15)


def test_paired_bootstrap():
  b = np.array([0.0, 1.0, 0.0, 1.0])
  a = b + 0.25
  out = metrics.paired_bootstrap(a, b, n_boot=300)
  assert out["diff"] == pytest.approx(0.25)
  assert out["diff_lo"] == pytest.approx(0.25) and out["diff_hi"] == pytest.approx(0.25)
  assert out["lift"] == pytest.approx(0.75 / 0.5 - 1)
  assert out["lift_lo"] <= out["lift"] <= out["lift_hi"]
  with pytest.raises(ValueError):
    metrics.paired_bootstrap(a, b[:3])


def test_paired_bootstrap_detects_no_difference():
  rng = np.random.default_rng(0)
  a = (rng.random(3000) < 0.2).astype(float)
  out = metrics.paired_bootstrap(a, a.copy())
  assert out["diff"] == 0 and out["diff_lo"] == 0 and out["diff_hi"] == 0
