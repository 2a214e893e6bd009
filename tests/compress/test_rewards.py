"""The compressor's rewards against values worked out by hand."""

import numpy as np
import pytest

from gr2_jax.compress import context as ctx_lib
from gr2_jax.compress import rewards
from gr2_jax.errors import UserError
from gr2_jax.rl.registry import COMPRESS_REWARDS


def test_compression():
  np.testing.assert_allclose(rewards.compression([10, 50, 120, 0], [100, 100, 100, 0]),
                             [0.9, 0.5, 0.0, 1.0])


def test_ellipsis_penalty():
  ctx = "History (oldest first):\nThe Silent Harbor (1990) | Drama, Mystery | rated 5"
  summaries = ["Likes quiet dramas and mysteries from the nineties.",
               "Likes dramas, mysteries...",
               "Dramas, comedies, etc.",
               "Likes dramas and mysteries.",
               "The Silent Harbor (1990) | Drama, Mystery | rated 5",
               "Mostly dramas … lately"]
  got = rewards.ellipsis_penalty(summaries, [ctx] * 6, [True, True, True, False, True, True])
  np.testing.assert_array_equal(got, [1.0, 0.0, 0.0, 0.0, 0.5, 0.0])
  # 5-grams: "the silent harbor 1990 drama" etc.; 4 of this summary's 5 are in the context.
  s = "the silent harbor 1990 drama mystery rated 5 but also westerns"
  assert rewards.copied_share(s, ctx) == pytest.approx(4 / 7)


def test_utility_and_judge_score():
  np.testing.assert_allclose(rewards.utility([0.5, 0.9, 0.2, np.nan], [0.7, 0.6, 0.9, 0.5]),
                             [0.8, 1.0, 0.3, 1.0], atol=1e-6)
  # solvable: 0.2 p/10 + 0.8 q/10; not: 0.8 p/10 + 0.2 q/10
  np.testing.assert_allclose(rewards.judge_score([1, 0], [5, 5], [10, 10]), [0.9, 0.6])


def test_preservation():
  genres = ["Action", "Children's", "Comedy", "Drama", "Sci-Fi"]
  gs = {"Drama": 0.5, "Comedy": 0.3, "Sci-Fi": 0.2}
  ds = {"1990s": 0.75, "1970s": 0.25}
  summaries = ["Likes drama; mostly 1990s films.",  # the top genre and decade: 1
               "Likes Comedy and Drama from the 1970s.",  # (0.3+0.5)/(0.5+0.3) = 1; 0.25/0.75
               "Likes Comedy, Action and Sci-Fi.",  # (0.3+0+0.2)/(0.5+0.3+0.2); no decade: 0
               "Likes dramatic children's films, 1990s",  # "dramatic" is no genre: 0; 1
               ""]
  got = rewards.preservation(summaries, [gs] * 5, [ds] * 5, genres)
  np.testing.assert_allclose(got, [1.0, (1 + 1 / 3) / 2, 0.5 / 2, 0.5, 0.0], atol=1e-6)
  # A history without years is judged on its genres alone.
  np.testing.assert_allclose(rewards.preservation(["Likes Comedy"], [gs], [{}], genres), [0.6],
                             atol=1e-6)


def test_history_shares():
  items = [{"title": "A", "year": 1994, "genres": ["Drama"]},
           {"title": "B", "year": 1971, "genres": ["Drama", "Comedy"]},
           {"title": "C", "genres": ["Comedy"]}]
  gs, ds = ctx_lib.history_shares([0, 1, 2, 0], items)
  assert gs == pytest.approx({"Drama": 3 / 5, "Comedy": 2 / 5})
  assert ds == pytest.approx({"1990s": 2 / 3, "1970s": 1 / 3})
  assert ctx_lib.history_shares([], items) == ({}, {})


def test_total_and_registry():
  got = rewards.total([0.8, 0.8, 0.8, 0.8], [1.0, 0.5, 1.0, 1.0], [1.0, 1.0, 0.5, 1.0],
                      alpha=0.25, empty=[False, False, False, True],
                      overlong=[False, True, False, False])
  np.testing.assert_allclose(got, [0.2 + 0.75, -1.0, 0.5 * 0.95, 0.0], atol=1e-6)
  with pytest.raises(UserError, match="alpha"):
    rewards.total([1], [1], [1], alpha=1.5, empty=[False], overlong=[False])
  assert set(COMPRESS_REWARDS.names()) == {"compression", "ellipsis", "utility", "judge",
                                         "preservation"}
