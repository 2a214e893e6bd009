"""The RL update: rows from rollouts, per-token log-probs against a plain forward and against
the sampler's tempered log-probs, the policy gradient against its closed form and a finite
difference, and skipped steps that leave the state bit-identical."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gr2_jax.errors import UserError
from gr2_jax.models import qwen3
from gr2_jax.parallel import mesh as mesh_lib
from gr2_jax.rl import learner
from gr2_jax.sampling import constraints
from gr2_jax.sampling import sampler
from tests.sampling.test_sampler import random_tiny

PAD = 0
STOP = 2
TEMPERATURE = 0.7


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


def _random_model():
  """The sampler tests' tiny model with 0.4-scale weights, whose samples vary."""
  return random_tiny(64)


def _rollout_rows(graphdef, params):
  """Rows of free and slate-constrained samples at TEMPERATURE, with their sampler log-probs."""
  model = nnx.merge(graphdef, params)
  prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
  kw = dict(max_new_tokens=6, temperature=TEMPERATURE, stop_tokens=[STOP], pad_id=PAD)
  free = sampler.sample(model, prompts, key=jax.random.key(0), **kw)
  slates = [[(20, 21), (20, 22), (30, 31)], [(40, 41), (20, 21), (42, 41)],
            [(50, 51), (52, 53), (54, 55)]]
  cons = sampler.sample(model, prompts, key=jax.random.key(1), **kw,
                        constraint=constraints.slate_constraint(slates, 64))
  responses, logps = [], []
  for out in (free, cons):
    toks, lps, lens = (np.asarray(x) for x in (out.tokens, out.logprobs, out.lengths))
    responses += [toks[b, :lens[b]].tolist() for b in range(len(prompts))]
    logps += [lps[b, :lens[b]] for b in range(len(prompts))]
  # Each constrained row is a permutation of its slate (3 items of 2 tokens fill the budget).
  for r, slate in zip(responses[3:], slates):
    assert sorted(tuple(r[i:i + 2]) for i in range(0, 6, 2)) == sorted(slate)
  rows = learner.build_rows(prompts * 2, responses, logps, 5 + 6, PAD)
  rows["advantages"] = np.array([1.0, -0.5, 0.75, -1.0, 0.5, -0.25], np.float32)
  return rows


def test_tempered_logps_reproduce_the_rollouts_so_the_on_policy_ratio_is_one():
  graphdef, params = _random_model()
  rows = _rollout_rows(graphdef, params)
  batch = {k: jnp.asarray(v) for k, v in rows.items()}
  mask = rows["mask"]
  assert mask.sum() >= 12
  new = np.asarray(learner.token_logps(graphdef, params, batch, temperature=TEMPERATURE))
  # The sampler's log-probs are over the unmasked tempered distribution, so the constrained
  # rows (3..5) match too.
  np.testing.assert_allclose(new[mask], rows["logp_old"][mask], atol=2e-5)
  np.testing.assert_allclose(
      learner.sequence_logps(graphdef, params, rows, temperature=TEMPERATURE), new, atol=2e-5)
  raw = np.asarray(learner.token_logps(graphdef, params, batch))
  assert np.abs(raw[mask] - rows["logp_old"][mask]).max() > 0.1  # T = 1 would not match
  _, m = learner.policy_loss(graphdef, params, batch,
                             learner.LossConfig(temperature=TEMPERATURE))
  assert float(m["mean_ratio"]) == pytest.approx(1.0, abs=2e-5)
  assert float(m["clip_frac_low"]) == 0.0 and float(m["clip_frac_high"]) == 0.0
  assert float(m["approx_kl"]) < 1e-8


def test_on_policy_gradient_matches_a_finite_difference_of_the_tempered_objective():
  graphdef, params = _random_model()
  batch = {k: jnp.asarray(v) for k, v in _rollout_rows(graphdef, params).items()}
  cfg = learner.LossConfig(temperature=TEMPERATURE)
  loss = jax.jit(lambda p: learner.policy_loss(graphdef, p, batch, cfg)[0])
  grad = jax.grad(loss)(params)
  rng = np.random.default_rng(1)
  direction = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
  along = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad),
                                                      jax.tree.leaves(direction)))
  # Small enough that every ratio stays inside the clip range (from eps ~ 3e-3 some leave it
  # and the central difference straddles a kink); float32 roundoff is ~1e-5 of the slope here.
  eps = 1e-4
  shifted = lambda s: loss(jax.tree.map(lambda x, d: x + s * eps * d, params, direction))
  central = (float(shifted(1.0)) - float(shifted(-1.0))) / (2 * eps)
  assert central == pytest.approx(along, rel=0.02)
  # The untempered loss has another slope here: the temperature is what the check tests.
  raw = jax.grad(lambda p: learner.policy_loss(graphdef, p, batch, learner.LossConfig())[0])
  raw_along = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(raw(params)),
                                                          jax.tree.leaves(direction)))
  assert raw_along != pytest.approx(along, rel=0.1)


def test_loss_config_rejects_a_non_positive_temperature():
  with pytest.raises(UserError, match="temperature=0"):
    learner.LossConfig(temperature=0.0)


def _step(model, lr=1e-2, temperature=1.0):
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  tx = optax.sgd(lr)
  cfg = learner.LossConfig(aggregation="token_mean", temperature=temperature)
  fn = jax.jit(learner.make_rl_step(graphdef, tx, lambda s: lr, cfg))
  st = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
  return graphdef, fn, st


@pytest.mark.parametrize("temperature", [1.0, TEMPERATURE])
def test_on_policy_gradient_is_the_advantage_weighted_score(temperature):
  model = _model()
  graphdef, fn, st = _step(model, temperature=temperature)
  rows = _rows()
  batch = {k: jnp.asarray(v) for k, v in rows.items()}
  # On policy (logp_old = current log-probs) the clipped ratio is 1 and its gradient is
  # -sum(A * grad log pi_T) / tokens under token_mean.
  batch["logp_old"] = learner.token_logps(graphdef, st["params"], batch, temperature)
  mask = batch["mask"]

  def closed_form(p):
    lp = learner.token_logps(graphdef, p, batch, temperature)
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
