"""The RL update: rows from rollouts, per-token log-probs against a plain forward, the policy
gradient against its closed form, and skipped steps that leave the state bit-identical."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gr2_jax.models import qwen3
from gr2_jax.parallel import mesh as mesh_lib
from gr2_jax.rl import learner

PAD = 0


def _model():
  cfg = qwen3.get_model_config("tiny", vocab_size=64)
  return mesh_lib.create_sharded_model(cfg, mesh_lib.single_device_mesh(), seed=3)


def _rows(logp_old=None):
  prompts = [[5, 6, 7], [9, 10]]
  responses = [[11, 12, 2], [13, 2]]
  lps = [np.array([-1.0, -2.0, -3.0]), np.array([-0.5, -0.25])]
  rows = learner.build_rows(prompts, responses, lps if logp_old is None else logp_old, 8, PAD)
  rows["advantages"] = np.array([1.0, -0.5], np.float32)
  return rows


def test_build_rows_marks_the_response_tokens():
  rows = _rows()
  np.testing.assert_array_equal(rows["tokens"][0], [5, 6, 7, 11, 12, 2, 0, 0])
  np.testing.assert_array_equal(rows["targets"][0], [6, 7, 11, 12, 2, 0, 0, 0])
  # Position t predicts t + 1: the mask starts at the prompt's last token.
  np.testing.assert_array_equal(rows["mask"][0], [0, 0, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(rows["mask"][1], [0, 1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_allclose(rows["logp_old"][0], [0, 0, -1, -2, -3, 0, 0, 0])
  np.testing.assert_array_equal(rows["segment_ids"][1], [1, 1, 1, 1, 0, 0, 0, 0])
  with pytest.raises(ValueError, match="width"):
    learner.build_rows([[1] * 6], [[2] * 3], [np.zeros(3)], 8, PAD)


def test_token_logps_match_a_forward_per_row():
  model = _model()
  graphdef, state = nnx.split(model)
  rows = _rows()
  got = np.asarray(learner.token_logps(graphdef, nnx.to_pure_dict(state),
                                       {k: jnp.asarray(v) for k, v in rows.items()}))
  for i in range(2):
    n = int(rows["segment_ids"][i].sum())
    toks = jnp.asarray(rows["tokens"][i:i + 1, :n])
    logits, _ = model(toks, jnp.arange(n)[None])
    ref = jax.nn.log_softmax(logits[0].astype(jnp.float32))
    want = [float(ref[t, rows["tokens"][i, t + 1]]) for t in range(n - 1)]
    np.testing.assert_allclose(got[i, :n - 1], want, atol=1e-5)


def _step(model, lr=1e-2):
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  tx = optax.sgd(lr)
  cfg = learner.LossConfig(aggregation="token_mean")
  fn = jax.jit(learner.make_rl_step(graphdef, tx, lambda s: lr, cfg))
  st = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
  return graphdef, fn, st


def test_on_policy_gradient_is_the_advantage_weighted_score():
  model = _model()
  graphdef, fn, st = _step(model)
  rows = _rows()
  batch = {k: jnp.asarray(v) for k, v in rows.items()}
  # On policy (logp_old = current log-probs) the clipped ratio is 1 and its gradient is
  # -sum(A * grad log pi) / tokens under token_mean.
  batch["logp_old"] = learner.token_logps(graphdef, st["params"], batch)
  mask = batch["mask"]

  def closed_form(p):
    lp = learner.token_logps(graphdef, p, batch)
    return -jnp.sum(jnp.where(mask, batch["advantages"][:, None] * lp, 0.0)) / jnp.sum(mask)

  want = jax.grad(closed_form)(st["params"])
  new, metrics = fn(jax.tree.map(jnp.copy, st), batch)
  assert float(metrics["skipped"]) == 0.0
  assert float(metrics["signal_tokens"]) == 5.0
  # SGD: new = old - lr * grad.
  got = jax.tree.map(lambda a, b: (a - b) / 1e-2, st["params"], new["params"])
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=2e-4, rtol=2e-3)
  assert int(new["step"]) == 1


@pytest.mark.parametrize("case", ["nan_logp", "no_advantage", "empty_mask"])
def test_bad_batches_are_skipped_and_leave_the_state_unchanged(case):
  model = _model()
  _, fn, st = _step(model)
  rows = _rows()
  if case == "nan_logp":
    rows["logp_old"][0, 3] = np.nan  # a NaN log-prob of a response token
  elif case == "no_advantage":
    rows["advantages"][:] = 0.0  # every group had zero reward variance
  else:
    rows["mask"][:] = False  # every rollout dropped (e.g. all invalid and filtered)
  before = jax.tree.map(np.asarray, st)
  new, metrics = fn(jax.tree.map(jnp.copy, st), {k: jnp.asarray(v) for k, v in rows.items()})
  assert float(metrics["skipped"]) == 1.0
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(new)):
    np.testing.assert_array_equal(a, np.asarray(b))
