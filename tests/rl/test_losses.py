"""Policy losses against hand-computed cases and loop-form numpy references."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gr2_jax.rl import losses
from gr2_jax.rl.registry import KL_ESTIMATORS
from gr2_jax.rl.registry import LOSS_AGGREGATIONS
from gr2_jax.rl.registry import POLICY_LOSSES


def _jit(fn, **params):
  return jax.jit(functools.partial(fn, **params))


def _np_kl(lp, lr, kind):
  log_r = lr - lp
  return {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": math.exp(log_r) - 1 - log_r}[kind]


def _np_aggregate(tok, mask, aggregation, max_len):
  """Loop reference of the aggregations; sequences without tokens do not count."""
  b, t = tok.shape
  if aggregation == "token_mean":
    num = sum(tok[i, j] for i in range(b) for j in range(t) if mask[i, j])
    return num / max(mask.sum(), 1)
  seqs = []
  for i in range(b):
    n = int(mask[i].sum())
    if n == 0:
      continue
    s = sum(tok[i, j] for j in range(t) if mask[i, j])
    seqs.append(s / n if aggregation == "seq_mean_token_mean" else s / (max_len or t))
  return sum(seqs) / max(len(seqs), 1)


def _np_ppo(lp_new, lp_old, adv, mask, eps_low, eps_high, aggregation, max_len=None,
            lp_ref=None, beta=0.0, kl="k3", sequence_ratio=False):
  b, t = lp_new.shape
  tok = np.zeros((b, t))
  for i in range(b):
    n = mask[i].sum()
    seq_lr = sum(lp_new[i, j] - lp_old[i, j] for j in range(t) if mask[i, j]) / max(n, 1)
    for j in range(t):
      if not mask[i, j]:
        continue
      ratio = math.exp(seq_lr if sequence_ratio else lp_new[i, j] - lp_old[i, j])
      clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
      tok[i, j] = -min(ratio * adv[i], clipped * adv[i])
      if beta:
        tok[i, j] += beta * _np_kl(lp_new[i, j], lp_ref[i, j], kl)
  return _np_aggregate(tok, mask, aggregation, max_len)


def _random_batch(seed, b=6, t=7):
  rng = np.random.default_rng(seed)
  lp_old = np.log(rng.uniform(0.05, 1.0, size=(b, t)))
  lp_new = lp_old + rng.normal(scale=0.3, size=(b, t))
  lp_ref = lp_old + rng.normal(scale=0.3, size=(b, t))
  adv = rng.normal(size=b)
  lengths = rng.integers(1, t + 1, size=b)
  lengths[1] = 0  # a sequence without tokens (a dropped group)
  mask = np.arange(t)[None] < lengths[:, None]
  return lp_new, lp_old, lp_ref, adv, mask


def test_ppo_clip_hand_case():
  # Four one-token sequences: ratio 1.5 / 1.5 / 0.5 / 0.5 with A = +1 / -1 / -1 / +1.
  ratio = np.array([[1.5], [1.5], [0.5], [0.5]])
  lp_old = np.full((4, 1), math.log(0.4))
  lp_new = lp_old + np.log(ratio)
  adv = np.array([1.0, -1.0, -1.0, 1.0])
  mask = np.ones((4, 1), bool)
  fn = _jit(losses.ppo_clip, eps_low=0.2, eps_high=0.28)
  loss, m = fn(lp_new, lp_old, adv, mask)
  # Per token: -1.28 (clipped high), 1.5 (pessimistic, unclipped), 0.8 (clipped low), -0.5.
  assert float(loss) == pytest.approx((-1.28 + 1.5 + 0.8 - 0.5) / 4, abs=1e-6)
  assert float(m["clip_frac_high"]) == pytest.approx(0.25)
  assert float(m["clip_frac_low"]) == pytest.approx(0.25)
  assert float(m["mean_ratio"]) == pytest.approx(1.0, abs=1e-6)
  k3 = [r - 1 - math.log(r) for r in (1.5, 1.5, 0.5, 0.5)]
  assert float(m["approx_kl"]) == pytest.approx(sum(k3) / 4, rel=1e-5)
  # Clipped tokens get no gradient; d(-A r)/d logp = -A r on the others.
  grad = jax.grad(lambda lp: fn(lp, lp_old, adv, mask)[0])(lp_new)
  np.testing.assert_allclose(grad[:, 0], [0.0, 1.5 / 4, 0.0, -0.5 / 4], atol=1e-6)
  # Plain GRPO: symmetric clip at 1.2.
  loss, _ = _jit(losses.ppo_clip, eps_low=0.2, eps_high=0.2)(lp_new, lp_old, adv, mask)
  assert float(loss) == pytest.approx((-1.2 + 1.5 + 0.8 - 0.5) / 4, abs=1e-6)


@pytest.mark.parametrize("seed,aggregation,kl", [(0, "token_mean", "k1"),
                                                (1, "seq_mean_token_mean", "k2"),
                                                (2, "seq_mean_token_sum_norm", "k3")])
def test_ppo_clip_matches_the_loop_reference(seed, aggregation, kl):
  lp_new, lp_old, lp_ref, adv, mask = _random_batch(seed)
  max_len = 10 if aggregation == "seq_mean_token_sum_norm" else None
  for eps_low, eps_high, beta in ((0.2, 0.28, 0.0), (0.1, 0.1, 0.05)):
    loss, m = _jit(losses.ppo_clip, eps_low=eps_low, eps_high=eps_high, kl_beta=beta,
                   kl_estimator=kl, aggregation=aggregation, max_len=max_len)(
                       lp_new, lp_old, adv, mask, logp_ref=lp_ref)
    ref = _np_ppo(lp_new, lp_old, adv, mask, eps_low, eps_high, aggregation, max_len, lp_ref,
                  beta, kl)
    assert float(loss) == pytest.approx(ref, rel=1e-4, abs=1e-6)
    if beta:
      kls = [_np_kl(lp_new[i, j], lp_ref[i, j], kl) for i, j in zip(*np.nonzero(mask))]
      assert float(m["kl_ref"]) == pytest.approx(np.mean(kls), rel=1e-4)


def test_gspo_matches_the_sequence_level_reference():
  lp_new, lp_old, _, adv, mask = _random_batch(3)
  for eps_low, eps_high in ((3e-4, 4e-4), (0.05, 0.1)):
    fn = _jit(losses.gspo, eps_low=eps_low, eps_high=eps_high)
    loss, _ = fn(lp_new, lp_old, adv, mask)
    ref = _np_ppo(lp_new, lp_old, adv, mask, eps_low, eps_high, "seq_mean_token_mean",
                  sequence_ratio=True)
    assert float(loss) == pytest.approx(ref, rel=1e-4, abs=1e-6)

    # Its gradient is that of GSPO's sequence objective -min(s A, clip(s) A), s the geometric
    # mean token ratio, averaged over sequences with tokens.
    def seq_objective(lp):
      m = jnp.asarray(mask)
      n = m.sum(-1)
      s = jnp.exp(jnp.where(m, lp - lp_old, 0.0).sum(-1) / jnp.maximum(n, 1))
      per = -jnp.minimum(s * adv, jnp.clip(s, 1 - eps_low, 1 + eps_high) * adv)
      return jnp.sum(jnp.where(n > 0, per, 0.0)) / jnp.sum(n > 0)

    grad = jax.jit(jax.grad(lambda lp: fn(lp, lp_old, adv, mask)[0]))  # noqa: B023
    np.testing.assert_allclose(grad(lp_new), jax.jit(jax.grad(seq_objective))(lp_new),
                               rtol=1e-4, atol=1e-6)


def test_aggregations_by_hand():
  tok = np.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
  mask = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]], bool)  # the last row has no tokens
  agg = LOSS_AGGREGATIONS.get
  assert float(agg("token_mean")(tok, mask)) == pytest.approx(10 / 4)
  assert float(agg("seq_mean_token_mean")(tok, mask)) == pytest.approx((2 + 4) / 2)
  assert float(agg("seq_mean_token_sum_norm")(tok, mask)) == pytest.approx((6 / 3 + 4 / 3) / 2)
  assert float(agg("seq_mean_token_sum_norm")(tok, mask, max_len=5)) == pytest.approx(1.0)
  empty = np.zeros_like(mask)
  for name in LOSS_AGGREGATIONS.names():
    assert float(agg(name)(tok, empty)) == 0.0


def test_kl_estimators_by_hand_and_in_expectation():
  lp, lr = np.log([[0.5]]), np.log([[0.25]])
  assert float(KL_ESTIMATORS.get("k1")(lp, lr)[0, 0]) == pytest.approx(math.log(2), rel=1e-6)
  assert float(KL_ESTIMATORS.get("k2")(lp, lr)[0, 0]) == pytest.approx(0.5 * math.log(2) ** 2,
                                                                        rel=1e-6)
  assert float(KL_ESTIMATORS.get("k3")(lp, lr)[0, 0]) == pytest.approx(0.5 - 1 + math.log(2),
                                                                        rel=1e-6)
  # k1 and k3 are unbiased for KL(p || q) on samples of p; k3 is never negative.
  p = np.array([0.5, 0.3, 0.2])
  q = np.array([0.2, 0.3, 0.5])
  kl = float(np.sum(p * np.log(p / q)))
  x = np.random.default_rng(0).choice(3, size=(1, 200_000), p=p)
  for name in ("k1", "k3"):
    est = np.asarray(KL_ESTIMATORS.get(name)(np.log(p)[x], np.log(q)[x]))
    assert est.mean() == pytest.approx(kl, rel=0.03)
  assert np.asarray(KL_ESTIMATORS.get("k3")(np.log(p)[x], np.log(q)[x])).min() >= 0


def test_padding_garbage_does_not_leak():
  lp_new, lp_old, lp_ref, adv, mask = _random_batch(5)
  garbage = lambda x: np.where(mask, x, np.nan)  # noqa: E731
  for name in POLICY_LOSSES.names():
    loss_fn = functools.partial(POLICY_LOSSES.get(name), kl_beta=0.1)

    @jax.jit
    def step(lp_new, lp_old, lp_ref, loss_fn=loss_fn):
      (loss, m), grads = jax.value_and_grad(
          lambda lp: loss_fn(lp, lp_old, adv, mask, logp_ref=lp_ref), has_aux=True)(lp_new)
      return loss, m, grads

    clean, _, clean_grads = step(lp_new, lp_old, lp_ref)
    loss, m, grads = step(garbage(lp_new), garbage(lp_old), garbage(lp_ref))
    assert float(loss) == pytest.approx(float(clean), rel=1e-6)
    np.testing.assert_allclose(grads, clean_grads, rtol=1e-5, atol=1e-7)
    assert bool(losses.finite_or_skip(loss, grads))
    assert all(np.isfinite(float(v)) for v in m.values())


def test_nan_log_probs_make_the_step_skip():
  lp_new, lp_old, _, adv, mask = _random_batch(6)
  lp_new = lp_new.copy()
  lp_new[0, 0] = np.nan  # a real response token
  loss, grads = jax.jit(jax.value_and_grad(
      lambda lp: losses.ppo_clip(lp, lp_old, adv, mask)[0]))(lp_new)
  assert not bool(losses.finite_or_skip(loss, grads))
  assert not bool(losses.finite_or_skip(0.5, {"w": jnp.array([1.0, jnp.inf])}))
  assert bool(losses.finite_or_skip(0.5, {"w": jnp.ones(2)}, num_valid=3))
  # All rollouts invalid / every group dropped: nothing to learn from.
  assert not bool(losses.finite_or_skip(0.0, {"w": jnp.ones(2)}, num_valid=0))
  old, new = {"w": jnp.ones(2)}, {"w": jnp.full(2, jnp.nan)}
  ok = losses.finite_or_skip(0.0, new)
  np.testing.assert_array_equal(losses.select_if(ok, new, old)["w"], [1.0, 1.0])
  np.testing.assert_array_equal(losses.select_if(True, {"w": jnp.zeros(2)}, old)["w"], [0, 0])


def test_overlong_penalty():
  lengths = np.array([0, 6, 7, 8, 9, 10, 12])
  np.testing.assert_allclose(losses.overlong_penalty(lengths, max_len=10, buffer=4),
                             [0, 0, -0.25, -0.5, -0.75, -1.0, -1.0], atol=1e-6)
  np.testing.assert_allclose(losses.overlong_penalty(lengths, max_len=10, buffer=0),
                             [0, 0, 0, 0, 0, 0, -1.0], atol=1e-6)


def test_kl_loss_gradients_in_expectation():
  # pi = softmax(theta) over 4 tokens; E_{x~pi}[d k(x) / d theta] summed exactly over x.
  theta = jnp.array([0.3, -0.2, 0.8, 0.0])
  logq = jnp.log(jnp.array([0.1, 0.4, 0.2, 0.3]))

  def expected_grad(name):
    def one(th, x):
      logp = jax.nn.log_softmax(th)
      return KL_ESTIMATORS.get(name)(logp[x][None, None], logq[x][None, None])[0, 0]
    p = jax.nn.softmax(theta)
    return sum(p[x] * jax.grad(one)(theta, x) for x in range(4))

  reverse = jax.grad(lambda th: jnp.sum(jax.nn.softmax(th) * (jax.nn.log_softmax(th) - logq)))
  forward = jax.grad(lambda th: jnp.sum(jnp.exp(logq) * (logq - jax.nn.log_softmax(th))))
  np.testing.assert_allclose(expected_grad("k2"), reverse(theta), atol=1e-6)
  np.testing.assert_allclose(expected_grad("k3"), forward(theta), atol=1e-6)
  np.testing.assert_allclose(expected_grad("k1"), np.zeros(4), atol=1e-6)


def test_opd_advantages_give_the_k2_reverse_kl_gradient_on_policy():
  from gr2_jax.rl import advantages  # pylint: disable=g-import-not-at-top
  lp, _, lq, _, mask = _random_batch(7)
  zero = np.zeros(lp.shape[0])

  def via_advantages(x):
    adv = advantages.opd_advantages(zero, x, lq, mask, beta=0.3)
    return losses.ppo_clip(x, x, adv, mask)[0]

  def via_k2(x):
    return losses.ppo_clip(x, x, zero, mask, logp_ref=lq, kl_beta=0.3, kl_estimator="k2")[0]

  g_adv = jax.jit(jax.grad(via_advantages))(lp)
  np.testing.assert_allclose(g_adv, jax.jit(jax.grad(via_k2))(lp), rtol=1e-5, atol=1e-7)
  assert float(np.abs(g_adv).sum()) > 0.01  # not trivially zero


def test_dual_clip_caps_the_loss_of_negative_advantages():
  # Two one-token sequences with ratio 5: A = -1 gives max(5, 1.2) = 5, capped at c = 3;
  # A = +1 gives max(-5, -1.2) = -1.2, which the dual clip leaves alone.
  logp_old = jnp.zeros((2, 1))
  logp_new = jnp.full((2, 1), np.log(5.0))
  adv = jnp.array([-1.0, 1.0])
  mask = jnp.ones((2, 1), bool)
  plain, _ = losses.ppo_clip(logp_new, logp_old, adv, mask, eps_low=0.2, eps_high=0.2)
  dual, m = losses.ppo_clip(logp_new, logp_old, adv, mask, eps_low=0.2, eps_high=0.2,
                            clip_ratio_c=3.0)
  np.testing.assert_allclose(plain, (5.0 - 1.2) / 2, rtol=1e-6)
  np.testing.assert_allclose(dual, (3.0 - 1.2) / 2, rtol=1e-6)
  np.testing.assert_allclose(m["clip_frac_dual"], 0.5)
  # The capped token carries no gradient (and the clipped positive one none either).
  grad = jax.grad(lambda lp: losses.ppo_clip(lp, logp_old, adv, mask, eps_low=0.2,
                                             eps_high=0.2, clip_ratio_c=3.0)[0])(logp_new)
  np.testing.assert_allclose(grad, 0.0)
