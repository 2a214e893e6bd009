"""The algorithm between rollouts and the update: overlong handling, which groups train, rows."""

import numpy as np
import pytest

from gr2_jax.rl import algorithm


def test_an_answer_cut_at_the_budget_never_keeps_its_reward():
  total = np.array([1.2, 1.2, 0.2, -1.0, 0.5])
  lengths = np.array([40, 100, 100, 100, 90])
  finished = np.array([True, False, False, False, True])
  # Hard penalty for every truncated answer (even a parsed one); without a buffer nothing else.
  out = algorithm.shape_rewards(total, lengths, finished, max_len=100, buffer=0,
                                invalid_penalty=-1.0)
  np.testing.assert_allclose(out, [1.2, -1.0, -1.0, -1.0, 0.5])
  # A buffer of 20 adds the soft ramp to finished answers past 80 tokens: 90 -> -0.5.
  out = algorithm.shape_rewards(total, lengths, finished, max_len=100, buffer=20,
                                invalid_penalty=-1.0)
  np.testing.assert_allclose(out, [1.2, -1.0, -1.0, -1.0, 0.0])


def test_plan_keeps_groups_with_signal_and_variance_first():
  rewards = np.array([[1.0, 1.0], [0.0, 1.0], [0.5, -1.0], [0.2, 0.9], [0.3, 0.3]])
  has_signal = np.array([True, True, False, True, True])
  plan = algorithm.plan_update(rewards, has_signal, algorithm.DAPO, train_groups=3)
  # Group 0 and 4: no variance; group 2: no signal. Groups 1 and 3 fill the update, then filler.
  np.testing.assert_array_equal(plan.keep, [False, True, False, True, False])
  np.testing.assert_array_equal(plan.selected[:2], [1, 3])
  np.testing.assert_array_equal(plan.selected_valid, [True, True, False])
  np.testing.assert_allclose(plan.advantages[1], [-1, 1], atol=1e-5)
  # Without dynamic sampling only the slates without signal are dropped.
  plan = algorithm.plan_update(rewards, has_signal, algorithm.GRPO, train_groups=3)
  np.testing.assert_array_equal(plan.selected, [0, 1, 3])
  np.testing.assert_array_equal(plan.selected_valid, [True, True, True])


def test_update_rows_mask_the_filler_and_carry_the_advantages():
  plan = algorithm.UpdatePlan(advantages=np.array([[0.5, -0.5], [1.0, -1.0]], np.float32),
                              keep=np.array([False, True]), selected=np.array([1, 0]),
                              selected_valid=np.array([True, False]))
  prompts = [[1, 2], [1, 3], [4, 5], [4, 6]]
  responses = [[7], [8, 9], [7, 7], [9]]
  logps = [np.array([-0.1]), np.array([-0.2, -0.3]), np.array([-0.4, -0.5]), np.array([-0.6])]
  seen = []
  rows = algorithm.update_rows(prompts, responses, logps, plan, group_size=2, width=6,
                               pad_id=0, ref_logps_fn=lambda r: seen.append(r) or
                               np.full(r["tokens"].shape, -2.0, np.float32))
  # Rows of group 1 (rollouts 2 and 3) first, then group 0 as masked filler.
  np.testing.assert_array_equal(rows["tokens"][0], [4, 5, 7, 7, 0, 0])
  np.testing.assert_array_equal(rows["advantages"], [1.0, -1.0, 0.0, 0.0])
  np.testing.assert_array_equal(rows["mask"].sum(1), [2, 1, 0, 0])
  np.testing.assert_allclose(rows["logp_old"][0, 1:3], [-0.4, -0.5])
  assert len(seen) == 1 and rows["logp_ref"].shape == (4, 6)


def test_slates_without_signal_are_found_per_reward():
  slates = {"slate": np.zeros((3, 4), np.int32), "target_index": np.array([0, -1, 3]),
            "grades": np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])}
  np.testing.assert_array_equal(algorithm.slate_has_signal("rank_promotion", slates),
                                [True, False, True])
  np.testing.assert_array_equal(algorithm.slate_has_signal("auc", slates), [True, False, False])


def test_loss_config_carries_every_loss_field():
  cfg = algorithm.DAPO.loss_config(max_len=64, temperature=0.7)
  assert (cfg.eps_high, cfg.aggregation, cfg.max_len, cfg.temperature) == (
      0.28, "token_mean", 64, pytest.approx(0.7))
