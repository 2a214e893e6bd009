"""The popularity ranks computed without a SASRec equal `rank_and_top_k`'s popularity column."""

import numpy as np
from flax import nnx

from gr2_jax.data import sasrec


def test_popularity_ranks_match_rank_and_top_k():
  rng = np.random.default_rng(0)
  n, rows = 60, 9
  pop = rng.integers(0, 15, n).astype(np.float32)  # many ties
  targets = rng.integers(0, n, rows).astype(np.int32)
  excluded = rng.integers(-1, n, (rows, 6)).astype(np.int32)
  excluded = np.where(excluded == targets[:, None], -1, excluded)
  cfg = sasrec.SASRecConfig(num_items=n, max_len=8, dim=8, num_blocks=1, num_heads=1,
                            dropout=0.0)
  model = sasrec.SASRec(cfg, rngs=nnx.Rngs(0))
  history = rng.integers(0, n, (rows, 8)).astype(np.int32)
  _, _, _, want = sasrec.rank_and_top_k(model, history, excluded, targets, pop, 3)
  got = sasrec.popularity_ranks(excluded, targets, pop)
  np.testing.assert_array_equal(got, want)
  # By hand for the first row: items strictly more popular than the target, not excluded.
  more = (pop > pop[targets[0]])
  more[excluded[0][excluded[0] >= 0]] = False
  assert got[0] == more.sum()
