"""Policy-gradient losses: PPO-clip with clip-higher, GSPO, KL to a reference, aggregations.

Per-token inputs, B sequences of T response positions:
  logp_new: float [B, T], log-probs of the sampled tokens under the policy being trained.
  logp_old: float [B, T], the same under the rollout policy (constant).
  advantages: float [B] per sequence (or [B, T] per token), constant.
  mask: bool/0-1 [B, T], the response tokens that count (prompt, padding and dropped groups are 0).
  logp_ref: optional float [B, T], a frozen reference (GRPO's KL) or teacher (OPD's reverse KL).
Masked positions are replaced by 0 before any arithmetic, so padding garbage (NaN, -inf) never
reaches the loss or its gradient. Every policy loss returns (loss scalar, metrics dict of
scalars) and is registered by name; aggregations and KL estimators are registered too.
"""

import jax
import jax.numpy as jnp

from gr2_jax.rl.registry import KL_ESTIMATORS
from gr2_jax.rl.registry import LOSS_AGGREGATIONS
from gr2_jax.rl.registry import POLICY_LOSSES

# exp() of a log-ratio beyond this is clipped: a ratio of e^20 is an outlier either way, and
# inf would turn the loss into NaN.
_MAX_LOG_RATIO = 20.0


def _masked(x, mask):
  return jnp.where(mask, jnp.asarray(x, jnp.float32), 0.0)


def masked_mean(x, mask):
  """Mean of x over mask (a scalar); 0 when the mask is empty."""
  mask = jnp.asarray(mask, bool)
  return jnp.sum(_masked(x, mask)) / jnp.maximum(jnp.sum(mask), 1)


# Aggregations: fn(token_loss [B, T], mask [B, T], max_len=None) -> scalar.


@LOSS_AGGREGATIONS.register("token_mean")
def token_mean(token_loss, mask, max_len=None):
  """DAPO: sum over every token of the batch / number of tokens (long answers weigh more)."""
  del max_len
  return masked_mean(token_loss, mask)


def _seq_mean(per_seq, mask):
  """Mean over the sequences that have at least one token."""
  has = jnp.any(mask, axis=-1)
  return jnp.sum(jnp.where(has, per_seq, 0.0)) / jnp.maximum(jnp.sum(has), 1)


@LOSS_AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(token_loss, mask, max_len=None):
  """Original GRPO: mean over each sequence's tokens, then over sequences."""
  del max_len
  mask = jnp.asarray(mask, bool)
  per_seq = jnp.sum(_masked(token_loss, mask), -1) / jnp.maximum(jnp.sum(mask, -1), 1)
  return _seq_mean(per_seq, mask)


@LOSS_AGGREGATIONS.register("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(token_loss, mask, max_len=None):
  """Dr.GRPO: each sequence's token sum / a constant max_len (default T), mean over sequences."""
  mask = jnp.asarray(mask, bool)
  max_len = mask.shape[-1] if max_len is None else max_len
  per_seq = jnp.sum(_masked(token_loss, mask), -1) / max_len
  return _seq_mean(per_seq, mask)


# KL estimators (Schulman, "Approximating KL divergence"): fn(logp, logp_ref) -> [B, T] per-token
# estimates of KL(pi || pi_ref) from tokens sampled by pi; with log_r = logp_ref - logp.
# Differentiated as a loss term their gradients differ from their values: in expectation over
# pi, k2's gradient is that of KL(pi || ref) (the reverse KL), k3's that of KL(ref || pi) (GRPO's
# usual choice) and k1's is zero. OPD's reverse KL to a teacher therefore uses k2 here, or
# `advantages.opd_advantages` (the KL as a per-token reward).


@KL_ESTIMATORS.register("k1")
def kl_k1(logp, logp_ref):
  """-log_r: unbiased, high variance, can be negative."""
  return jnp.asarray(logp, jnp.float32) - jnp.asarray(logp_ref, jnp.float32)


@KL_ESTIMATORS.register("k2")
def kl_k2(logp, logp_ref):
  """(log_r)^2 / 2: biased, low variance, >= 0."""
  log_r = jnp.asarray(logp_ref, jnp.float32) - jnp.asarray(logp, jnp.float32)
  return 0.5 * log_r**2


@KL_ESTIMATORS.register("k3")
def kl_k3(logp, logp_ref):
  """(r - 1) - log_r: unbiased, low variance, >= 0."""
  log_r = jnp.asarray(logp_ref, jnp.float32) - jnp.asarray(logp, jnp.float32)
  log_r = jnp.clip(log_r, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
  return jnp.expm1(log_r) - log_r


def _broadcast_advantages(advantages, shape):
  adv = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
  return adv[:, None] * jnp.ones(shape, jnp.float32) if adv.ndim == 1 else adv


def _clipped_loss(log_ratio, token_log_ratio, advantages, logp_new, mask, logp_ref, eps_low,
                  eps_high, clip_ratio_c, kl_beta, kl_estimator, aggregation, max_len):
  """Shared tail of ppo_clip and gspo.

  log_ratio: [B, T] log of the ratio that is clipped; token_log_ratio: [B, T] plain per-token
  log(pi_new / pi_old), for the approx-KL metric.
  """
  adv = _broadcast_advantages(advantages, mask.shape)
  ratio = jnp.exp(jnp.clip(log_ratio, -_MAX_LOG_RATIO, _MAX_LOG_RATIO))
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  token_loss = jnp.maximum(unclipped, clipped)
  metrics = {}
  if clip_ratio_c:
    # Dual-clip: for A < 0 the loss -A r grows without bound in r; cap it at -A c.
    capped = (adv < 0) & (token_loss > -adv * clip_ratio_c)
    token_loss = jnp.where(adv < 0, jnp.minimum(token_loss, -adv * clip_ratio_c), token_loss)
    metrics["clip_frac_dual"] = masked_mean(jax.lax.stop_gradient(capped), mask)
  # kl_beta is config (a Python number); a traced value always adds the term.
  if logp_ref is not None and not (isinstance(kl_beta, (int, float)) and kl_beta == 0):
    ref = jax.lax.stop_gradient(_masked(logp_ref, mask))
    kl = KL_ESTIMATORS.get(kl_estimator)(logp_new, ref)
    token_loss = token_loss + kl_beta * kl
    metrics["kl_ref"] = masked_mean(kl, mask)
  agg = LOSS_AGGREGATIONS.get(aggregation)
  loss = agg(token_loss, mask, max_len=max_len)
  ratio_sg = jax.lax.stop_gradient(ratio)
  tlr = jax.lax.stop_gradient(jnp.clip(token_log_ratio, -_MAX_LOG_RATIO, _MAX_LOG_RATIO))
  metrics.update({
      # Tokens whose gradient the clip removes, below (A < 0) and above (A > 0) the trust region.
      "clip_frac_low": masked_mean((ratio_sg < 1.0 - eps_low) & (adv < 0), mask),
      "clip_frac_high": masked_mean((ratio_sg > 1.0 + eps_high) & (adv > 0), mask),
      "mean_ratio": masked_mean(ratio_sg, mask),
      # k3 estimate of KL(pi_old || pi_new) on the rollout tokens.
      "approx_kl": masked_mean(jnp.expm1(tlr) - tlr, mask),
      "num_tokens": jnp.sum(mask).astype(jnp.float32),
  })
  return loss, metrics


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(logp_new, logp_old, advantages, mask, *, logp_ref=None, eps_low=0.2, eps_high=0.28,
             clip_ratio_c=0.0, kl_beta=0.0, kl_estimator="k3", aggregation="token_mean",
             max_len=None):
  """Token-level PPO-clip: max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) + beta * KL.

  eps_high > eps_low is DAPO's clip-higher; plain GRPO uses eps_low == eps_high. clip_ratio_c
  > 1 adds the dual clip: for A < 0 the token loss is at most -A * clip_ratio_c.
  """
  mask = jnp.asarray(mask, bool)
  logp_new = _masked(logp_new, mask)
  logp_old = jax.lax.stop_gradient(_masked(logp_old, mask))
  log_ratio = logp_new - logp_old
  return _clipped_loss(log_ratio, log_ratio, advantages, logp_new, mask, logp_ref, eps_low,
                       eps_high, clip_ratio_c, kl_beta, kl_estimator, aggregation, max_len)


@POLICY_LOSSES.register("gspo")
def gspo(logp_new, logp_old, advantages, mask, *, logp_ref=None, eps_low=3e-4, eps_high=4e-4,
         clip_ratio_c=0.0, kl_beta=0.0, kl_estimator="k3", aggregation="seq_mean_token_mean",
         max_len=None):
  """GSPO: the clipped ratio is the sequence's geometric-mean token ratio.

  Written per token as s_i * pi(y_t) / sg(pi(y_t)) with s_i held constant, so its value is s_i
  on every token and, under seq_mean_token_mean, its gradient is GSPO's
  s_i * A_i * mean_t grad log pi(y_t). advantages must be per sequence [B].
  """
  mask = jnp.asarray(mask, bool)
  logp_new = _masked(logp_new, mask)
  logp_old = jax.lax.stop_gradient(_masked(logp_old, mask))
  token_log_ratio = logp_new - logp_old
  seq_log_ratio = jnp.sum(token_log_ratio, -1) / jnp.maximum(jnp.sum(mask, -1), 1)
  log_ratio = (jax.lax.stop_gradient(seq_log_ratio)[:, None] + logp_new
               - jax.lax.stop_gradient(logp_new))
  return _clipped_loss(log_ratio, token_log_ratio, advantages, logp_new, mask, logp_ref, eps_low,
                       eps_high, clip_ratio_c, kl_beta, kl_estimator, aggregation, max_len)


@POLICY_LOSSES.register("opd")
def opd(logp_new, logp_old, advantages, mask, *, logp_ref=None, kl_full=None, eps_low=0.2,
        eps_high=0.28, clip_ratio_c=0.0, kl_beta=1.0, kl_estimator="k1",
        aggregation="token_mean", max_len=None):
  """On-policy distillation: PPO-clip on the reward's advantage A plus beta x the per-token
  reverse KL(student || teacher) on the student's own rollouts; `logp_ref` is the frozen
  teacher's log-prob of each sampled token.

  kl_estimator:
    "k1", "k3": the estimator of the sampled token, held constant, is a per-token negative
      reward: A_t = A - beta * k_t. With k1 (log p - log q) its policy gradient is the reverse
      KL's, unbiased; k3 ((r - 1) - log r, r = q / p) has lower variance and a bias.
    "full": the exact sum_v p(v) (log p(v) - log q(v)) at each position (`kl_full` [B, T],
      differentiable in the student: `learner.distill_stats`) is added to the token loss.
  With A = 0 (`beta`-only OPD) the loss is the reverse KL alone.
  """
  mask = jnp.asarray(mask, bool)
  if logp_ref is None:
    raise ValueError("opd needs the teacher's log-probs (logp_ref)")
  logp_new = _masked(logp_new, mask)
  logp_old = jax.lax.stop_gradient(_masked(logp_old, mask))
  teacher = jax.lax.stop_gradient(_masked(logp_ref, mask))
  adv = _broadcast_advantages(advantages, mask.shape)
  log_ratio = logp_new - logp_old
  if kl_estimator == "full":
    if kl_full is None:
      raise ValueError("kl_estimator='full' needs kl_full [B, T] (learner.distill_stats)")
    kl = _masked(kl_full, mask)
    loss, metrics = _clipped_loss(log_ratio, log_ratio, adv, logp_new, mask, None, eps_low,
                                  eps_high, clip_ratio_c, 0.0, "k1", aggregation, max_len)
    loss = loss + kl_beta * LOSS_AGGREGATIONS.get(aggregation)(kl, mask, max_len=max_len)
  else:
    kl = _masked(KL_ESTIMATORS.get(kl_estimator)(logp_new, teacher), mask)
    adv = adv - kl_beta * jax.lax.stop_gradient(kl)
    loss, metrics = _clipped_loss(log_ratio, log_ratio, adv, logp_new, mask, None, eps_low,
                                  eps_high, clip_ratio_c, 0.0, "k1", aggregation, max_len)
  # The sampled-token k1 estimate is reported whatever the estimator, so runs compare.
  metrics["kl_teacher"] = masked_mean(jax.lax.stop_gradient(kl), mask)
  metrics["kl_teacher_k1"] = masked_mean(jax.lax.stop_gradient(logp_new) - teacher, mask)
  return loss, metrics


def overlong_penalty(lengths, max_len: int, buffer: int):
  """DAPO's soft overlong ramp, float32 [N]: 0 up to max_len - buffer, linear to -1 at max_len.

  Lengths beyond max_len get -1. An answer cut at the budget is handled by
  `algorithm.shape_rewards` (the hard penalty), whatever its length.
  """
  lengths = jnp.asarray(lengths, jnp.float32)
  start = max_len - buffer
  ramp = (start - lengths) / max(buffer, 1)
  return jnp.where(lengths <= start, 0.0, jnp.maximum(ramp, -1.0)).astype(jnp.float32)


def finite_or_skip(loss, grads=None, num_valid=None):
  """bool scalar: the step may be applied (loss and every gradient finite, something to learn).

  num_valid: optional count of rollouts / groups / tokens that carry signal; 0 (e.g. every
  rollout invalid or every group dropped) means skip. Use with `select_if` inside the jitted
  step so that a skipped step leaves the train state bit-identical.
  """
  ok = jnp.all(jnp.isfinite(loss))
  for leaf in jax.tree.leaves(grads):
    ok = ok & jnp.all(jnp.isfinite(leaf))
  if num_valid is not None:
    ok = ok & (jnp.asarray(num_valid) > 0)
  return ok


def select_if(ok, new, old):
  """The pytree `new` where ok, else `old` (leafwise; both trees have the same structure)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
