"""Tests for the logical-axis rules table."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gr2_jax.errors import UserError
from gr2_jax.parallel import mesh as mesh_lib
from gr2_jax.parallel import sharding


def test_default_rules_map_param_and_activation_axes():
  assert sharding.logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
  assert sharding.logical_to_spec(("embed", "heads", "head_dim")) == P("fsdp", "tensor", None)
  assert sharding.logical_to_spec(("batch", "length", "act_embed")) == P(("data", "fsdp"), None,
                                                                         None)


def test_mesh_axis_used_once_and_first_rule_wins():
  rules = (("a", "tensor"), ("b", ("tensor", "fsdp")), ("a", "data"))
  assert sharding.logical_to_spec(("a", "b"), rules) == P("tensor", "fsdp")
  assert sharding.logical_to_spec(("unknown", None), rules) == P(None, None)


def test_axes_missing_from_mesh_or_not_dividing_are_dropped():
  mesh = mesh_lib.make_mesh((2, 2, 2), jax.devices()[:8])
  # Batch 2 divides data (2) but not data*fsdp (4): only data is kept.
  assert sharding.logical_to_spec(("batch",), mesh=mesh, shape=(2,)) == P("data")
  assert sharding.logical_to_spec(("batch",), mesh=mesh, shape=(1,)) == P(None)
  two_axis = mesh_lib.make_mesh((4, 2), jax.devices()[:8], axis_names=("data", "tensor"))
  assert sharding.logical_to_spec(("vocab", "embed"), mesh=two_axis) == P("tensor", None)


def test_rules_from_config_lists_and_errors():
  rules = sharding.normalize_rules([["batch", ["data"]], ["embed", None]])
  assert rules == (("batch", ("data",)), ("embed", None))
  with pytest.raises(UserError, match="pair"):
    sharding.normalize_rules([("batch",)])
  with pytest.raises(UserError, match="embed"):
    sharding.normalize_rules([("embed", 3)])


class _HeldBy:
  """A stand-in sharding whose process holds the given index boxes of the array."""

  def __init__(self, *held):
    self.held = held

  def addressable_devices_indices_map(self, shape):
    del shape
    return dict(enumerate(self.held))


def test_process_box_merges_the_devices_slices_and_refuses_a_gap():
  s = slice(None)
  # Two devices holding rows 4..6 and 6..8 of every column: the process's box is rows 4..8.
  held = _HeldBy((slice(4, 6), s), (slice(6, 8), s))
  assert sharding.process_box(held, (8, 3)) == (slice(4, 8), slice(0, 3))
  # A replicated copy of the same rows on a third device changes nothing.
  held = _HeldBy((slice(4, 6), s), (slice(6, 8), s), (slice(4, 6), s))
  assert sharding.process_box(held, (8, 3)) == (slice(4, 8), slice(0, 3))
  with pytest.raises(ValueError, match="dimension 0: gap at 2..4"):
    sharding.process_box(_HeldBy((slice(0, 2), s), (slice(4, 6), s)), (8, 3))


def test_put_global_in_one_process_holds_the_whole_array():
  mesh = mesh_lib.make_mesh((8, 1, 1), jax.devices()[:8])
  named = jax.sharding.NamedSharding(mesh, P("data"))
  x = np.arange(16 * 3, dtype=np.float64).reshape(16, 3)
  assert sharding.process_box(named, x.shape) == (slice(0, 16), slice(0, 3))
  y = sharding.put_global(x, named)
  assert y.sharding == named and y.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(y), x)
