"""Tests for the logical-axis rules table."""

import jax
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
