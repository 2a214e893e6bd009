"""Tests of the random last level and collision statistics."""

import numpy as np
import pytest

from gr2_jax.sids import codes


def test_uniqueness_and_largest_collision():
  c = np.array([[0, 1], [0, 1], [0, 1], [2, 3], [4, 5]])
  assert codes.uniqueness(c) == pytest.approx(3 / 5)
  assert codes.largest_collision(c) == 3


def test_random_last_level_makes_unique_within_range():
  prefix = np.array([[0, 1]] * 5 + [[2, 3]] * 2 + [[4, 4]])
  full = codes.random_last_level(prefix, codebook_size=8, seed=3)
  assert full.shape == (8, 3)
  np.testing.assert_array_equal(full[:, :2], prefix)
  assert codes.uniqueness(full) == 1.0
  assert full[:, 2].min() >= 0 and full[:, 2].max() < 8
  # Deterministic for a seed.
  np.testing.assert_array_equal(full, codes.random_last_level(prefix, 8, seed=3))


def test_random_last_level_adds_second_level_for_big_groups():
  prefix = np.zeros((10, 1), np.int32)  # 10 items share one prefix, 4 codes per level
  full = codes.random_last_level(prefix, codebook_size=4, seed=0)
  assert full.shape == (10, 3)
  assert codes.uniqueness(full) == 1.0
  assert full[:, 1:].max() < 4
  with pytest.raises(ValueError):
    codes.random_last_level(np.zeros((17, 1)), codebook_size=4)
