"""The re-ranking table on slates small enough to check by hand."""

import numpy as np

from gr2_jax.eval import tables


def _slates():
  return {
      "target_index": np.array([0, 2]),
      "labels": np.array([[1, 0, 0], [0, 1, 1]], np.int8),
      "grades": np.array([[2, 0, 0], [0, 1, 2]], np.int8),
  }


def test_order_by_scores_is_stable_descending():
  order = tables.order_by_scores(np.array([[1.0, 3.0, 3.0, 2.0]]))
  np.testing.assert_array_equal(order, [[1, 2, 3, 0]])


def test_per_example_values():
  order = np.array([[0, 1, 2], [2, 1, 0]])  # example 2: target (slot 2) moved to the top
  vals = tables.per_example(order, _slates())
  np.testing.assert_array_equal(vals["R@1"], [1, 1])
  legacy = tables.per_example(np.array([[0, 1, 2], [0, 1, 2]]), _slates())
  np.testing.assert_array_equal(legacy["R@1"], [1, 0])
  np.testing.assert_allclose(legacy["N@3"], [1.0, 0.5])
  # Example 2 under the legacy order: negative first, then two positives -> AUC 0.
  np.testing.assert_allclose(legacy["AUC"], [1.0, 0.0])


def test_evaluate_adds_paired_lift_against_reference():
  slates = _slates()
  orders = {"legacy": np.array([[0, 1, 2], [0, 1, 2]]), "model": np.array([[0, 1, 2], [2, 1, 0]])}
  rows = tables.evaluate(orders, slates, n_boot=50)
  assert "lift" not in rows["legacy"]
  assert rows["model"]["R@1"]["mean"] == 1.0
  assert rows["legacy"]["R@1"]["mean"] == 0.5
  assert rows["model"]["lift"]["R@1"]["lift"] == 1.0  # 1.0 / 0.5 - 1
  text = tables.format_table(rows)
  assert "| model | 1.0000" in text and "+100.0%" in text


def test_random_orders_are_permutations():
  order = tables.random_orders(50, 10, seed=0)
  np.testing.assert_array_equal(np.sort(order, axis=1), np.tile(np.arange(10), (50, 1)))
  np.testing.assert_array_equal(order, tables.random_orders(50, 10, seed=0))
