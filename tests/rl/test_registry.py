"""Registries: lookup, errors that list the choices, and the registered variants."""

import dataclasses

import ml_collections
import pytest

from gr2_jax import rl  # noqa: F401  (registers every variant)
from gr2_jax.rl import algorithm
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
  assert registry.ADVANTAGES.names() == ["dr_grpo", "grpo", "rloo", "zero"]
  assert registry.POLICY_LOSSES.names() == ["gspo", "opd", "ppo_clip"]
  assert registry.LOSS_AGGREGATIONS.names() == [
      "seq_mean_token_mean", "seq_mean_token_sum_norm", "token_mean"]
  assert registry.KL_ESTIMATORS.names() == ["k1", "k2", "k3"]


def test_algorithm_presets_name_registered_variants():
  for name, alg in algorithm.ALGORITHMS.items():
    assert algorithm.get(name).validate() is alg
  dapo = algorithm.get("dapo")
  assert (dapo.eps_low, dapo.eps_high, dapo.kl_beta) == (0.2, 0.28, 0.0)
  assert dapo.aggregation == "token_mean" and dapo.dynamic_sampling
  with pytest.raises(dataclasses.FrozenInstanceError):
    dapo.eps_high = 1.0  # frozen: a preset cannot be changed by accident
  with pytest.raises(UserError, match="choose one of dapo, dr_grpo, grpo, gspo, opd"):
    algorithm.get("ppo")


def test_section_overrides_and_bad_values():
  c = ml_collections.ConfigDict({"algorithm": "grpo", **{f: None for f in algorithm.FIELDS}})
  assert algorithm.from_section(c) == algorithm.GRPO
  c.kl_beta, c.clip_ratio_c = 0.0, 3.0
  alg = algorithm.from_section(c)
  assert (alg.kl_beta, alg.clip_ratio_c, alg.eps_high) == (0.0, 3.0, 0.2)
  c.clip_ratio_c = 0.5
  with pytest.raises(UserError, match="clip_ratio_c 0.5 must be > 1"):
    algorithm.from_section(c)
  c.clip_ratio_c, c.aggregation = None, "sum"
  with pytest.raises(UserError, match="unknown loss aggregation 'sum'"):
    algorithm.from_section(c)


def test_the_exact_kl_needs_the_opd_loss():
  with pytest.raises(UserError, match="policy_loss 'opd' only"):
    dataclasses.replace(algorithm.GRPO, kl_estimator="full").validate()
  opd = algorithm.get("opd")
  assert (opd.policy_loss, opd.kl_estimator, opd.dynamic_sampling) == ("opd", "full", False)
