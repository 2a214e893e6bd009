"""Advantages against hand values and loop references; fixed-shape dynamic sampling."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gr2_jax.errors import UserError
from gr2_jax.rl import advantages
from gr2_jax.rl.registry import ADVANTAGES


def _ref(rewards, kind, eps=1e-6):
  """Loop reference, one sample at a time."""
  out = np.zeros_like(rewards, np.float64)
  for p, group in enumerate(rewards):
    g = len(group)
    mean = sum(group) / g
    std = (sum((x - mean) ** 2 for x in group) / g) ** 0.5
    for i, x in enumerate(group):
      if kind == "grpo":
        out[p, i] = (x - mean) / (std + eps)
      elif kind == "dr_grpo":
        out[p, i] = x - mean
      else:
        out[p, i] = x - (sum(group) - x) / (g - 1)
  return out


def test_hand_values():
  r = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
  # Mean 0.5, std 0.5; a constant group gets zero advantage, not NaN.
  np.testing.assert_allclose(advantages.grpo(r), [[1, -1, -1, 1], [0, 0, 0, 0]], atol=1e-5)
  np.testing.assert_allclose(advantages.dr_grpo(r), [[.5, -.5, -.5, .5], [0, 0, 0, 0]], atol=1e-6)
  np.testing.assert_allclose(advantages.rloo(r), [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0] * 4],
                             atol=1e-6)


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
def test_match_the_loop_reference(kind):
  r = np.random.default_rng(1).normal(size=(6, 5))
  r[2] = 0.3  # a zero-variance group
  np.testing.assert_allclose(jax.jit(ADVANTAGES.get(kind))(r), _ref(r, kind), rtol=1e-4,
                             atol=1e-5)


def test_rloo_needs_two_samples():
  with pytest.raises(UserError, match="at least 2 samples"):
    advantages.rloo(np.zeros((3, 1)))


def test_group_keep_mask():
  r = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.2, 0.2, 0.2], [-1.0, 0.4, 0.4]])
  np.testing.assert_array_equal(advantages.group_keep_mask(r), [False, True, False, True])
  np.testing.assert_array_equal(
      advantages.group_keep_mask(r, prompt_mask=np.array([1, 1, 1, 0], bool)),
      [False, True, False, False])


def test_select_groups_kept_first_with_fixed_shapes():
  p, g = 5, 3
  batch = {"rewards": np.arange(p * g, dtype=np.float32).reshape(p, g),
           "ids": np.arange(p) * 10}
  traces = []

  def fn(batch, keep):
    traces.append(1)
    return advantages.select_groups(batch, keep, 4)

  fn = jax.jit(fn)
  keep = np.array([False, True, False, True, True])
  out, valid = fn(batch, keep)
  np.testing.assert_array_equal(out["ids"], [10, 30, 40, 0])  # kept in order, then filler
  np.testing.assert_array_equal(out["rewards"][0], [3, 4, 5])
  np.testing.assert_array_equal(valid, [True, True, True, False])
  # Too few kept: the rest is masked filler; all kept beyond num_groups: first ones win.
  out, valid = fn(batch, np.array([False, False, True, False, False]))
  np.testing.assert_array_equal(out["ids"], [20, 0, 10, 30])
  np.testing.assert_array_equal(valid, [True, False, False, False])
  out, valid = fn(batch, np.ones(p, bool))
  np.testing.assert_array_equal(out["ids"], [0, 10, 20, 30])
  assert bool(valid.all())
  out, valid = fn(batch, np.zeros(p, bool))
  assert not bool(valid.any())
  assert len(traces) == 1  # one compilation for every keep pattern


def test_select_groups_needs_enough_groups():
  with pytest.raises(UserError, match="cannot select 4 groups from a batch of 3"):
    advantages.select_groups(jnp.zeros((3, 2)), jnp.ones(3, bool), 4)


def test_dynamic_sampling_pipeline():
  # Oversample 4 prompts x 2, keep the 2 with signal, normalise within groups.
  r = np.array([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.5, 0.0]])
  keep = advantages.group_keep_mask(r)
  sel, valid = advantages.select_groups({"r": r}, keep, 2)
  np.testing.assert_allclose(functools.partial(advantages.grpo, eps=0.0)(sel["r"]),
                             [[-1, 1], [1, -1]], atol=1e-6)
  assert bool(valid.all())


def test_opd_advantages_add_the_reverse_kl_per_token():
  adv = np.array([1.0, -0.5])
  logp = np.log([[0.5, 0.2, 0.9], [0.3, 0.3, 0.3]])
  teacher = np.log([[0.25, 0.4, 0.9], [0.6, 0.3, 0.3]])
  mask = np.array([[1, 1, 1], [1, 1, 0]], bool)
  out = advantages.opd_advantages(adv, logp, teacher, mask, beta=0.5)
  ln2 = np.log(2.0)
  np.testing.assert_allclose(out, [[1 - 0.5 * ln2, 1 + 0.5 * ln2, 1.0],
                                   [-0.5 + 0.5 * ln2, -0.5, 0.0]], atol=1e-6)
