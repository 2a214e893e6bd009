"""Tests of the SID report statistics."""

import numpy as np
import pytest

from gr2_jax.sids import report


def test_level_stats_by_hand():
  c = np.array([[0, 0], [0, 1], [1, 2], [1, 3]])
  stats = report.level_stats(c, codebook_size=4)
  assert stats[0]["utilisation"] == 0.5 and stats[0]["perplexity"] == pytest.approx(2.0)
  assert stats[1]["utilisation"] == 1.0 and stats[1]["perplexity"] == pytest.approx(4.0)


def test_neighbourhood_by_hand():
  # Two tight pairs far apart: each item's single nearest neighbour is its pair mate.
  emb = np.array([[1, 0], [0.99, 0.1], [0, 1], [0.1, 0.99]], np.float32)
  share, chance = report.neighbourhood(emb, np.array([0, 0, 1, 1]), k=1)
  assert share == 1.0
  assert chance == pytest.approx(4 / 12)  # 2 groups of 2: sum n(n-1) / N(N-1)
  share, _ = report.neighbourhood(emb, np.array([0, 1, 0, 1]), k=1)
  assert share == 0.0


def test_recon_error_is_fraction_of_variance():
  x = np.array([[0.0, 0.0], [2.0, 2.0]])
  assert report.recon_error(x, x) == 0.0
  assert report.recon_error(x, np.ones_like(x)) == pytest.approx(1.0)


def test_sid_report_and_tables():
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(6, 3))
  c = np.array([[0, 0, 0], [0, 0, 1], [1, 0, 0], [1, 1, 0], [2, 1, 0], [3, 1, 0]])
  rep = report.sid_report(c, 2, 4, emb, emb)
  assert rep["uniqueness_learned"] == pytest.approx(5 / 6)
  assert rep["uniqueness_full"] == 1.0
  assert rep["largest_collision"] == 2
  assert rep["recon_error"] == 0.0
  assert "83.3333%" in report.format_report(rep)
  md = report.ablation_markdown([("plain", rep)])
  assert md.splitlines()[2].startswith("| plain | 83.33% | 100.00% | 100.00% |")
