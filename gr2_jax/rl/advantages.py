"""Group advantages and DAPO dynamic sampling with fixed shapes.

Rewards come as [P, G]: P prompts (groups) x G sampled responses each. Every estimator has the
signature `fn(rewards, **params) -> advantages [P, G]` (float32) and is registered by name.
"""

import jax
import jax.numpy as jnp

from gr2_jax.errors import UserError
from gr2_jax.rl.registry import ADVANTAGES


@ADVANTAGES.register("grpo")
def grpo(rewards, *, eps=1e-6):
  """(r - group mean) / (group std + eps); population std (ddof 0)."""
  r = jnp.asarray(rewards, jnp.float32)
  mean = jnp.mean(r, axis=-1, keepdims=True)
  std = jnp.std(r, axis=-1, keepdims=True)
  return (r - mean) / (std + eps)


@ADVANTAGES.register("dr_grpo")
def dr_grpo(rewards):
  """r - group mean: Dr.GRPO drops the std, which over-weights near-constant groups."""
  r = jnp.asarray(rewards, jnp.float32)
  return r - jnp.mean(r, axis=-1, keepdims=True)


@ADVANTAGES.register("rloo")
def rloo(rewards):
  """r_i - mean of the other G - 1 rewards of the group (needs G >= 2)."""
  r = jnp.asarray(rewards, jnp.float32)
  g = r.shape[-1]
  if g < 2:
    raise UserError(f"rloo needs at least 2 samples per prompt, got {g}; raise the group size")
  return (r - jnp.mean(r, axis=-1, keepdims=True)) * (g / (g - 1))


@ADVANTAGES.register("zero")
def zero(rewards):
  """No reward advantage: with the OPD loss, distillation from the teacher's KL alone."""
  return jnp.zeros_like(jnp.asarray(rewards, jnp.float32))


def opd_advantages(advantages, logp, logp_teacher, mask, *, beta=1.0):
  """On-policy distillation: float32 [B, T] per-token advantages for `losses.ppo_clip`.

  A_t = A - beta * (logp_t - logp_teacher_t): the sequence advantage [B] of the reward plus the
  per-token reverse KL(student || teacher) as a negative reward, held constant, so that its
  policy gradient is the reverse KL's gradient. Masked positions get 0.
  """
  mask = jnp.asarray(mask, bool)
  kl = jnp.where(mask, jnp.asarray(logp, jnp.float32) - jnp.asarray(logp_teacher, jnp.float32),
                 0.0)
  adv = jnp.asarray(advantages, jnp.float32)[:, None] - beta * kl
  return jax.lax.stop_gradient(jnp.where(mask, adv, 0.0))


def group_keep_mask(rewards, prompt_mask=None, *, atol=1e-6):
  """bool [P]: groups whose rewards are not all equal (they carry a gradient).

  prompt_mask: optional bool [P] ANDed in (e.g. the rewards' has_signal per prompt).
  """
  r = jnp.asarray(rewards, jnp.float32)
  keep = (jnp.max(r, axis=-1) - jnp.min(r, axis=-1)) > atol
  if prompt_mask is not None:
    keep = keep & jnp.asarray(prompt_mask, bool)
  return keep


def select_groups(batch, keep, num_groups: int):
  """A fixed-size batch of `num_groups` groups, kept groups first.

  batch: pytree whose leaves have a leading axis of P >= num_groups groups (an oversampled
  batch); keep: bool [P]. Returns (selected, valid): every leaf gathered to a leading axis of
  num_groups, kept groups in their original order followed by dropped ones as filler, and
  valid bool [num_groups] marking real (kept) groups. Shapes never depend on `keep`, so a jitted
  step does not recompile; the driver masks the filler out of the loss with `valid`.
  """
  keep = jnp.asarray(keep, bool)
  p = keep.shape[0]
  if num_groups > p:
    raise UserError(f"cannot select {num_groups} groups from a batch of {p}; oversample at least "
                    "as many prompts as the train batch holds")
  # Stable sort on "not kept": kept groups first, each part in its original order.
  idx = jnp.argsort(~keep, stable=True)[:num_groups]
  valid = jnp.arange(num_groups) < jnp.sum(keep)
  selected = jax.tree.map(lambda x: jnp.take(jnp.asarray(x), idx, axis=0), batch)
  return selected, valid
