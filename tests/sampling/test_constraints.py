"""Tests of the trie and slate constraints, stepped by hand without a model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gr2_jax.errors import UserError
from gr2_jax.sampling import constraints

V = 12
# Jitted once per constraint shape: eager op-by-op dispatch would dominate the test time.
_ALLOWED = jax.jit(lambda c, state: c.allowed(state))
_UPDATE = jax.jit(lambda c, state, tokens: c.update(state, tokens))


def _allowed(c, state):
  return [sorted(np.flatnonzero(row).tolist()) for row in np.asarray(_ALLOWED(c, state))]


def _step(c, state, tokens):
  return _UPDATE(c, state, jnp.array(tokens))


def test_trie_walk():
  # Items (2, 3, 9), (2, 4, 9), (5, 6, 9); 1 may end the output at the root.
  c = constraints.trie_constraint([[2, 3, 9], [2, 4, 9], [5, 6, 9]], V, root_tokens=[1])
  state = c.init(2)
  assert _allowed(c, state) == [[1, 2, 5], [1, 2, 5]]
  state = _step(c, state, [2, 5])
  assert _allowed(c, state) == [[3, 4], [6]]
  state = _step(c, state, [4, 6])
  assert _allowed(c, state) == [[9], [9]]
  state = _step(c, state, [9, 9])  # both items complete: back at the root
  assert _allowed(c, state) == [[1, 2, 5], [1, 2, 5]]
  state = _step(c, state, [1, 2])  # a root token keeps row 0 at the root
  assert _allowed(c, state) == [[1, 2, 5], [3, 4]]


def test_trigger_mode():
  # Free text until 7 (sid_begin), then an item (3, 4, 8) or (3, 5, 8), then free again.
  c = constraints.trie_constraint([[3, 4, 8], [3, 5, 8]], V, trigger=7)
  state = c.init(1)
  assert _allowed(c, state) == [list(range(V))]
  for token, want in [(0, list(range(V))), (7, [3]), (3, [4, 5]), (5, [8]),
                      (8, list(range(V)))]:
    state = _step(c, state, [token])
    assert _allowed(c, state) == [want], token


def test_slate_each_item_once_and_trigger_closed_when_exhausted():
  # Row 0's slate: items A=(3, 4) and B=(3, 5); row 1's slate: C=(6, 4) only. Trigger 7.
  c = constraints.slate_constraint([[[3, 4], [3, 5]], [[6, 4]]], V, trigger=7)
  state = c.init(2)
  free = list(range(V))
  assert _allowed(c, state) == [free, free]
  state = _step(c, state, [7, 7])
  assert _allowed(c, state) == [[3], [6]]  # only the row's own items
  state = _step(c, state, [3, 6])
  assert _allowed(c, state) == [[4, 5], [4]]
  state = _step(c, state, [5, 4])  # row 0 emitted B, row 1 emitted C
  # Row 1 has nothing left: the trigger is no longer allowed.
  assert _allowed(c, state) == [free, [t for t in free if t != 7]]
  state = _step(c, state, [7, 0])
  assert _allowed(c, state) == [[3], [t for t in free if t != 7]]
  state = _step(c, state, [3, 0])
  assert _allowed(c, state) == [[4], [t for t in free if t != 7]]  # B is used up


def test_slate_without_trigger_runs_dry():
  c = constraints.slate_constraint([[[3, 4]]], V)
  state = _step(c, _step(c, c.init(1), [3]), [4])
  assert _allowed(c, state) == [[]]


@pytest.mark.parametrize("seqs, match", [
    ([[1, 2], [1, 2, 3]], "prefix-free"),
    ([[1, 2, 3], [1, 2]], "prefix-free"),
    ([[1, 99]], "outside the vocabulary"),
    ([[]], "empty"),
])
def test_bad_sequences(seqs, match):
  with pytest.raises(UserError, match=match):
    constraints.trie_constraint(seqs, V)


def test_batch_mismatch():
  c = constraints.slate_constraint([[[3, 4]], [[5, 6]]], V)
  with pytest.raises(UserError, match="built for 2 rows"):
    c.init(3)


def test_slate_constraint_shapes_do_not_depend_on_the_items():
  # Padded tables: one compiled sampler serves every batch of the same slate shape.
  a = constraints.slate_constraint([[[5, 6, 9], [5, 7, 9]], [[8, 6, 9], [8, 7, 9]]], 20,
                                   trigger=3)
  b = constraints.slate_constraint([[[5, 6, 9], [5, 6, 9]], [[5, 6, 9], [5, 7, 9]]], 20,
                                   trigger=3)
  shapes = lambda c: jax.tree.map(lambda x: x.shape, c)
  assert shapes(a) == shapes(b)


def test_group_constraint_lists_numbers_once_and_closes_with_the_last():
  # Tokens: "1"=1, "0"=2, "2"=3, ","=4, "]"=5; 0, 6, 7 other digit-free tokens. The numbers 1, 2
  # and 10 end with "," while another is left and with "]" as the last: "1" then "10" share
  # their first token, and the closing token tells them apart.
  going_on = [[[1, 4]], [[3, 4]], [[1, 2, 4]]]
  closing = [[[1, 5]], [[3, 5]], [[1, 2, 5]]]
  c = constraints.group_constraint(going_on, V, closing=closing, root_tokens=[0, 4, 5, 6, 7])
  root = [0, 4, 5, 6, 7]
  state = c.init(2)
  assert _allowed(c, state) == [sorted(root + [1, 3])] * 2
  # Row 0 writes "10, 1, 2]", row 1 "1, 10, 2]".
  for tokens, want in [
      ([1, 1], [[2, 4], [2, 4]]),  # "1" may end (",") or go on to "10"; no "]": 3 numbers left
      ([2, 4], [[4], sorted(root + [1, 3])]),
      ([4, 1], [sorted(root + [1, 3]), [2]]),  # row 1 listed 1: "1" must become "10"
      ([1, 2], [[4], [4]]),  # row 0 listed 10: "1" must end
      ([4, 4], [sorted(root + [3])] * 2),
      ([3, 3], [[5], [5]]),  # the last number closes the list
      ([5, 5], [root, root]),  # all listed: digits are no longer allowed
  ]:
    state = _step(c, state, tokens)
    assert _allowed(c, state) == want, tokens


def test_group_constraint_rejects_a_sequence_in_two_groups():
  with pytest.raises(UserError, match="listed twice"):
    constraints.group_constraint([[[1, 4]], [[1, 4]]], V)
  with pytest.raises(UserError, match="listed twice"):
    constraints.group_constraint([[[1, 4]]], V, closing=[[[1, 4]]])
