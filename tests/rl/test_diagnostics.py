"""Re-ranking diagnostics against hand values and scipy's Kendall tau."""

import math

import numpy as np
import pytest

from gr2_jax.rl import diagnostics


def test_kendall_tau_by_hand():
  order = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 2, 3], [1, 2, 3, 0]])
  # One adjacent swap: 5 concordant, 1 discordant; rotating 0 to the end: 3 c, 3 d.
  np.testing.assert_allclose(diagnostics.kendall_tau(order), [1.0, -1.0, 4 / 6, 0.0])


def test_kendall_tau_matches_scipy():
  from scipy import stats  # pylint: disable=g-import-not-at-top  (a test extra)
  rng = np.random.default_rng(0)
  order = np.argsort(rng.random((20, 10)), axis=1)
  expected = [stats.kendalltau(np.arange(10), o).statistic for o in order]
  np.testing.assert_allclose(diagnostics.kendall_tau(order), expected, rtol=1e-12)


def test_rerank_diagnostics():
  order = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [3, 0, 2, 1], [0, 0, 0, 0]])
  valid = np.array([True, True, True, False])
  logps = np.array([[-1.0, -2.0], [-3.0, np.nan]])
  d = diagnostics.rerank_diagnostics(valid, order, lengths=[10, 20, 30, 60], token_logps=logps,
                                     token_mask=[[1, 1], [1, 0]])
  assert d["num_rollouts"] == 4 and d["num_valid"] == 3
  assert d["valid_rate"] == 0.75
  assert d["identity_rate"] == pytest.approx(1 / 3)
  # [3, 0, 2, 1]: pairs (3,0) d, (3,2) d, (3,1) d, (0,2) c, (0,1) c, (2,1) d -> (2 - 4) / 6.
  assert d["kendall_tau"] == pytest.approx((1 - 1 - 1 / 3) / 3)
  np.testing.assert_array_equal(d["top_input_position_hist"], [1, 0, 0, 2])  # invalid ignored
  assert d["mean_response_length"] == 30.0
  # Without sampling entropies, `entropy` is the Monte Carlo -mean log p.
  assert d["neg_logp"] == pytest.approx(2.0) and d["entropy"] == pytest.approx(2.0)


def test_entropy_is_the_mean_entropy_of_the_sampled_distributions():
  # Two tokens, each drawn from a distribution with two allowed tokens: a fair coin (log 2)
  # and a certain one (0); the padded third entry is ignored.
  ents = np.array([[np.log(2.0), 0.0], [np.nan, 0.0]])
  logps = np.array([[-np.log(2.0), -0.5], [0.0, 0.0]])
  d = diagnostics.rerank_diagnostics(np.ones(2, bool), np.zeros((2, 3), int), token_logps=logps,
                                     token_entropies=ents, token_mask=[[1, 1], [0, 0]])
  assert d["entropy"] == pytest.approx(np.log(2.0) / 2)
  assert d["neg_logp"] == pytest.approx((np.log(2.0) + 0.5) / 2)
  d = diagnostics.rerank_diagnostics(np.ones(1, bool), np.zeros((1, 3), int),
                                     token_entropies=[1.0, 3.0])
  assert d["entropy"] == 2.0 and "neg_logp" not in d


def test_no_valid_output():
  d = diagnostics.rerank_diagnostics(np.zeros(2, bool), np.zeros((2, 3), int))
  assert d["num_valid"] == 0 and d["valid_rate"] == 0.0
  assert math.isnan(d["identity_rate"]) and math.isnan(d["kendall_tau"])
  np.testing.assert_array_equal(d["top_input_position_hist"], [0, 0, 0])
  assert "entropy" not in d and "neg_logp" not in d and "mean_response_length" not in d
