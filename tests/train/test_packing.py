"""Packing: layout, targets and weights, and that packed examples never see each other."""

import jax
import numpy as np
import pytest
from flax import nnx

from gr2_jax.errors import UserError
from gr2_jax.models import qwen3
from gr2_jax.train import packing


def test_layout_targets_and_weights():
  ex = [([5, 6, 7], [0, 1, 1]), ([8, 9], [1, 2]), ([10, 11, 12, 13], [0, 0, 1, 1])]
  rows = packing.pack(ex, seq_len=6, pad_id=0, tasks=[0, 1, 2])
  # Next-fit: [5 6 7 8 9 _] then [10 11 12 13 _ _].
  np.testing.assert_array_equal(rows["tokens"], [[5, 6, 7, 8, 9, 0], [10, 11, 12, 13, 0, 0]])
  np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]])
  np.testing.assert_array_equal(rows["targets"][0, :5], [6, 7, 0, 9, 0])
  np.testing.assert_array_equal(rows["weights"], [[1, 1, 0, 2, 0, 0], [0, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(rows["task"], [[0, 0, -1, 1, -1, -1], [2, 2, 2, -1, -1, -1]])


def test_too_long_example_is_a_user_error():
  with pytest.raises(UserError, match="example 1 has 5 tokens but the sequence length is 4"):
    packing.pack([([1, 2], [1, 1]), ([1, 2, 3, 4, 5], [1] * 5)], seq_len=4)


def test_packed_logits_equal_unpacked():
  cfg = qwen3.get_model_config("tiny", vocab_size=32, num_layers=1)
  model = qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))
  a, b = [3, 4, 5, 6], [7, 8, 9]
  rows = packing.pack([(a, [1] * 4), (b, [1] * 3)], seq_len=8)
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda t, p, s: qwen3.apply(graphdef, state, t, p, segment_ids=s)[0])
  packed = run(rows["tokens"], rows["positions"], rows["segment_ids"])
  for start, ids in ((0, a), (4, b)):
    alone = run(np.asarray([ids]), np.arange(len(ids))[None], np.ones((1, len(ids)), np.int32))
    np.testing.assert_allclose(packed[0, start:start + len(ids)], alone[0], atol=1e-5)


def test_pointers_move_with_their_example():
  ex = [([5, 6, 7], [0, 1, 1]), ([8, 9, 10], [0, 1, 1])]
  # Example 0: position 2 points at its position 0; example 1: position 1 at its position 0.
  rows = packing.pack(ex, seq_len=8, pointers={"route": [[-1, -1, 0], [-1, 0, -1]]})
  np.testing.assert_array_equal(rows["route"], [[-1, -1, 0, -1, 3, -1, -1, -1]])
  with pytest.raises(UserError, match="pointer field 'route' of example 1"):
    packing.pack(ex, seq_len=8, pointers={"route": [[-1, -1, 0], [-1, 3, -1]]})
  with pytest.raises(UserError, match="one array per example"):
    packing.pack(ex, seq_len=8, pointers={"route": [[-1, -1, 0]]})
