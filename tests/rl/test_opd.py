"""On-policy distillation: the chunked student/teacher statistics against an unchunked
forward, the exact reverse-KL gradient, the sampled-token forms against the KL-as-reward
advantages, the OPD step's skip on a non-finite KL, and the teacher-compatibility check."""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gr2_jax.errors import UserError
from gr2_jax.models import qwen3
from gr2_jax.parallel import mesh as mesh_lib
from gr2_jax.rl import advantages as adv_lib
from gr2_jax.rl import learner
from gr2_jax.rl import losses
from tests.rl.test_learner import _rows

TEMPERATURE = 0.7


def _model(seed, layers=None):
  cfg = qwen3.get_model_config("tiny", vocab_size=64)
  if layers is not None:
    cfg = dataclasses.replace(cfg, num_layers=layers)
  model = mesh_lib.create_sharded_model(cfg, mesh_lib.single_device_mesh(), seed=seed)
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def _batch():
  return {k: jnp.asarray(v) for k, v in _rows().items()}


def _reference(graphdef, params, batch):
  """Unchunked tempered log-softmax [B, T, V] of one model."""
  model = nnx.merge(graphdef, params)
  logits = model(batch["tokens"], batch["positions"], segment_ids=batch["segment_ids"])
  logits = logits[0] if isinstance(logits, tuple) else logits
  return jax.nn.log_softmax(logits.astype(jnp.float32) / TEMPERATURE, axis=-1)


@pytest.mark.parametrize("chunk", [0, 3, 128])
def test_distill_stats_match_an_unchunked_forward(chunk):
  gs, ps = _model(1)
  gt, pt = _model(2, layers=1)  # a shallower teacher is fine: same vocabulary
  b = _batch()
  logp, logq, kl = learner.distill_stats(gs, ps, gt, pt, b, TEMPERATURE, True, chunk)
  lp, lq = _reference(gs, ps, b), _reference(gt, pt, b)
  tgt = np.asarray(b["targets"])[..., None]
  take = lambda l: np.take_along_axis(np.asarray(l), tgt, -1)[..., 0]
  np.testing.assert_allclose(logp, take(lp), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logq, take(lq), rtol=1e-5, atol=1e-5)
  ref_kl = np.sum(np.exp(lp) * (lp - lq), -1)
  np.testing.assert_allclose(kl, ref_kl, rtol=1e-4, atol=1e-6)
  assert (np.asarray(kl) >= -1e-6).all()
  np.testing.assert_allclose(logp, learner.token_logps(gs, ps, b, TEMPERATURE), rtol=1e-5,
                             atol=1e-5)


def _cfg(estimator, beta=0.5):
  return learner.LossConfig(policy_loss="opd", kl_beta=beta, kl_estimator=estimator,
                            temperature=TEMPERATURE)


def test_full_kl_gradient_is_the_exact_reverse_kl_gradient():
  gs, ps = _model(1)
  gt, pt = _model(2)
  b = _batch()
  b["advantages"] = jnp.zeros_like(b["advantages"])  # beta-only OPD
  b["logp_old"] = learner.token_logps(gs, ps, b, TEMPERATURE) * b["mask"]  # on policy
  grad = jax.grad(lambda p: learner.opd_loss(gs, p, gt, pt, b, _cfg("full", 0.5))[0])(ps)
  mask = np.asarray(b["mask"], np.float32)

  def exact(p):
    lp, lq = _reference(gs, p, b), jax.lax.stop_gradient(_reference(gt, pt, b))
    kl = jnp.sum(jnp.exp(lp) * (lp - lq), -1)
    return 0.5 * jnp.sum(kl * mask) / mask.sum()

  ref = jax.grad(exact)(ps)
  for a, r in zip(jax.tree.leaves(grad), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, r, rtol=2e-3, atol=2e-6)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_sampled_forms_equal_ppo_clip_with_the_kl_as_a_per_token_reward(estimator):
  gs, ps = _model(1)
  gt, pt = _model(2)
  b = _batch()
  logp = learner.token_logps(gs, ps, b, TEMPERATURE)
  b["logp_old"] = logp * b["mask"]
  logq = learner.token_logps(gt, pt, b, TEMPERATURE)
  # Reference: the sampled estimator held constant, subtracted from the sequence advantage.
  k = losses.KL_ESTIMATORS.get(estimator)(logp, logq)
  per_token = jnp.where(b["mask"], b["advantages"][:, None] - 0.5 * k, 0.0)

  def ref_loss(p):
    lp = learner.token_logps(gs, p, b, TEMPERATURE)
    return losses.ppo_clip(lp, b["logp_old"], per_token, b["mask"])[0]

  def opd(p):
    return learner.opd_loss(gs, p, gt, pt, b, _cfg(estimator, 0.5))[0]

  np.testing.assert_allclose(opd(ps), ref_loss(ps), rtol=1e-5)
  for a, r in zip(jax.tree.leaves(jax.grad(opd)(ps)), jax.tree.leaves(jax.grad(ref_loss)(ps))):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-7)
  if estimator == "k1":  # the same advantages as the existing KL-as-reward helper
    np.testing.assert_allclose(
        per_token, adv_lib.opd_advantages(b["advantages"], logp, logq, b["mask"], beta=0.5),
        rtol=1e-6)


def test_opd_step_trains_the_student_and_skips_a_non_finite_kl():
  gs, ps = _model(1)
  gt, pt = _model(2)
  b = _batch()
  b["advantages"] = jnp.zeros_like(b["advantages"])
  b["logp_old"] = learner.token_logps(gs, ps, b, 1.0) * b["mask"]
  tx = optax.adam(1e-2)
  cfg = learner.LossConfig(policy_loss="opd", kl_beta=1.0, kl_estimator="full")
  step = jax.jit(learner.make_opd_step(gs, gt, tx, lambda s: 1e-2, cfg))
  state = {"params": ps, "opt_state": tx.init(ps), "step": jnp.int32(0)}
  kls = []
  for _ in range(5):
    state, m = step(state, pt, b)
    kls.append(float(m["kl_teacher"]))
    assert float(m["skipped"]) == 0
  assert kls[-1] < kls[0]  # the student moves toward the teacher on its states
  bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), pt)  # a NaN teacher
  new, m = step(jax.tree.map(jnp.copy, state), bad, b)
  assert float(m["skipped"]) == 1
  for a, r in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, r)


def test_teacher_with_another_vocabulary_is_refused():
  small = qwen3.get_model_config("tiny", vocab_size=64)
  big = qwen3.get_model_config("tiny", vocab_size=96)
  with pytest.raises(UserError, match="vocabulary"):
    learner.check_teacher(small, big)
  learner.check_teacher(small, small)


def test_teacher_on_its_own_devices_matches_the_in_pass_teacher():
  """8 fake CPU devices split 4 + 4: the teacher's log-probs computed on its half and moved to
  the student's equal a one-device forward, and the OPD step (k1) fed with them equals the step
  that runs the teacher in its own pass."""
  assert jax.device_count() >= 8
  devices = jax.devices()[:8]
  student_mesh = mesh_lib.make_mesh((4, 1, 1), devices[:4])
  teacher_mesh = mesh_lib.make_mesh((4, 1, 1), devices[4:])
  assert not set(student_mesh.devices.flat) & set(teacher_mesh.devices.flat)
  gs, ps = _model(1)
  gt, pt = _model(2)
  rows = {k: np.concatenate([v, v[::-1]]) for k, v in _rows().items()}  # 4 rows: 1 per device
  b = {k: jnp.asarray(v) for k, v in rows.items()}
  b["logp_old"] = learner.token_logps(gs, ps, b, 1.0) * b["mask"]
  rep = lambda mesh, tree: jax.device_put(tree, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))
  logq = learner.teacher_logps(gt, rep(teacher_mesh, pt), rows, 1.0, teacher_mesh, student_mesh)
  assert set(logq.sharding.device_set) == set(student_mesh.devices.flat)
  np.testing.assert_allclose(logq, learner.token_logps(gt, pt, b, 1.0), rtol=1e-5, atol=1e-5)

  tx = optax.sgd(1e-1)  # (Adam's normalisation would magnify rounding in near-zero gradients)
  cfg = learner.LossConfig(policy_loss="opd", kl_beta=0.5, kl_estimator="k1")
  in_pass = jax.jit(learner.make_opd_step(gs, gt, tx, lambda s: 1e-2, cfg))
  split = jax.jit(learner.make_opd_step(gs, None, tx, lambda s: 1e-2, cfg))
  state = {"params": ps, "opt_state": tx.init(ps), "step": jnp.int32(0)}
  s1, m1 = in_pass(jax.tree.map(jnp.copy, state), pt, b)
  s2, m2 = split(rep(student_mesh, state), None, rep(student_mesh, dict(b, logp_ref=logq)))
  assert float(m2["skipped"]) == 0
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["kl_teacher"], m2["kl_teacher"], rtol=1e-5, atol=1e-7)
  for a, r in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)
