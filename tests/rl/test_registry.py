"""Registries: lookup, errors that list the choices, and the registered variants."""

import pytest

from gr2_jax import rl  # noqa: F401  (registers every variant)
from gr2_jax.errors import UserError
from gr2_jax.rl import registry


def test_register_and_get():
  reg = registry.Registry("widget")

  @reg.register("b")
  def fn_b():
    return 2

  reg.register("a")(lambda: 1)
  assert reg.get("b") is fn_b
  assert reg.get("a")() == 1
  assert reg.names() == ["a", "b"]
  assert "a" in reg and "c" not in reg


def test_unknown_name_is_a_user_error_listing_the_choices():
  reg = registry.Registry("widget")
  reg.register("x")(lambda: 0)
  reg.register("y")(lambda: 0)
  with pytest.raises(UserError, match=r"unknown widget 'z': choose one of x, y"):
    reg.get("z")


def test_duplicate_registration_fails():
  reg = registry.Registry("widget")
  reg.register("x")(lambda: 0)
  with pytest.raises(ValueError, match="twice"):
    reg.register("x")(lambda: 1)


def test_every_variant_is_registered():
  assert registry.REWARDS.names() == ["auc", "graded_ndcg", "naive", "rank_promotion"]
  assert registry.ADVANTAGES.names() == ["dr_grpo", "grpo", "rloo"]
  assert registry.POLICY_LOSSES.names() == ["gspo", "ppo_clip"]
  assert registry.LOSS_AGGREGATIONS.names() == [
      "seq_mean_token_mean", "seq_mean_token_sum_norm", "token_mean"]
  assert registry.KL_ESTIMATORS.names() == ["k1", "k2", "k3"]


def test_algorithm_presets_name_registered_variants():
  for name in registry.ALGORITHMS:
    cfg = registry.algorithm(name)
    registry.ADVANTAGES.get(cfg["advantage"])
    registry.POLICY_LOSSES.get(cfg["policy_loss"])
    registry.LOSS_AGGREGATIONS.get(cfg["aggregation"])
    registry.KL_ESTIMATORS.get(cfg["kl_estimator"])
  dapo = registry.algorithm("dapo")
  assert (dapo["eps_low"], dapo["eps_high"], dapo["kl_beta"]) == (0.2, 0.28, 0.0)
  assert dapo["aggregation"] == "token_mean" and dapo["dynamic_sampling"]
  dapo["eps_high"] = 1.0  # a copy: the table itself is unchanged
  assert registry.algorithm("dapo")["eps_high"] == 0.28
  with pytest.raises(UserError, match="choose one of dapo, dr_grpo, grpo, gspo"):
    registry.algorithm("ppo")
