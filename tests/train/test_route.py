"""Attention routing: the attention the model exposes, the route loss against a by-hand
computation, the pointers of a rendered re-ranking prompt, and a step that follows its
gradient."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gr2_jax.errors import UserError
from gr2_jax.models import qwen3
from gr2_jax.train import packing
from gr2_jax.train import route
from gr2_jax.train import trainer as trainer_lib


def _model(layers=2):
  cfg = qwen3.get_model_config("tiny", vocab_size=40, num_layers=layers)
  return qwen3.Qwen3(cfg, rngs=nnx.Rngs(3))


def _manual_attention(model, tokens, positions, layer):
  """Softmax(q k^T / sqrt(d)) of `layer` from its own parameters, in numpy (float64)."""
  cfg = model.cfg
  x = model.embed_tokens(tokens)
  cos, sin = qwen3.rope_tables(positions, cfg.head_dim, cfg.rope_theta)
  t = tokens.shape[1]
  mask = jnp.tril(jnp.ones((1, t, t), bool))
  for lay in model.layers[:layer]:
    x, _ = lay(x, cos, sin, mask)
  at = model.layers[layer].self_attn
  h = model.layers[layer].input_layernorm(x)
  q, k = at.q_proj(h), at.k_proj(h)
  if at.qk_norm:
    q, k = at.q_norm(q), at.k_norm(k)
  q = np.asarray(qwen3.apply_rope(q, cos, sin), np.float64)[0]  # [T, H, D]
  k = np.asarray(qwen3.apply_rope(k, cos, sin), np.float64)[0]  # [T, KVH, D]
  g = cfg.num_heads // cfg.num_kv_heads
  out = np.zeros((cfg.num_kv_heads, g, t, t))
  for j in range(cfg.num_kv_heads):
    for i in range(g):
      s = q[:, j * g + i] @ k[:, j].T / np.sqrt(cfg.head_dim)
      s = np.where(np.tril(np.ones((t, t))) > 0, s, -np.inf)
      e = np.exp(s - s.max(-1, keepdims=True))
      out[j, i] = e / e.sum(-1, keepdims=True)
  return out


def test_hidden_and_attention_match_hidden_and_a_manual_softmax():
  model = _model()
  tokens = jnp.asarray([[3, 9, 4, 17, 8, 2]])
  positions = jnp.arange(6)[None]
  x, attn = model.hidden_and_attention(tokens, positions, 1)
  ref, _ = model.hidden(tokens, positions)
  np.testing.assert_allclose(x, ref, atol=1e-6)
  assert attn.shape == (1, 2, 2, 6, 6)
  np.testing.assert_allclose(np.exp(attn[0]), _manual_attention(model, tokens, positions, 1),
                             atol=1e-5)
  with pytest.raises(UserError, match="attention of layer 2"):
    model.hidden_and_attention(tokens, positions, 2)


def test_route_nll_by_hand():
  logp = np.log(np.full((1, 2, 2, 3, 3), 1 / 3))
  logp[0, 0, 0, 2] = np.log([0.5, 0.25, 0.25])
  logp[0, 0, 1, 2] = np.log([0.125, 0.75, 0.125])
  pointers = np.asarray([[-1, -1, 0]])
  total, n = route_nll_call(logp, pointers, 0)
  # Query 2 routed to key 0: heads 0 and 1 of group 0 put 0.5 and 0.125 there.
  assert n == 1
  np.testing.assert_allclose(total, -(np.log(0.5) + np.log(0.125)) / 2, rtol=1e-6)
  total, _ = route_nll_call(logp, pointers, 1)  # group 1: uniform attention
  np.testing.assert_allclose(total, np.log(3), rtol=1e-6)


def route_nll_call(logp, pointers, group):
  total, n = route.route_nll(jnp.asarray(logp, jnp.float32), jnp.asarray(pointers), group)
  return float(total), float(n)


def _rows():
  ex = [([3, 9, 4, 17, 8, 2], [0, 0, 0, 1, 1, 1]), ([5, 6, 7, 8], [0, 0, 1, 1])]
  pointers = [[-1, -1, 1, 2, -1, -1], [-1, 0, -1, -1]]
  rows = packing.pack(ex, seq_len=12, pointers={route.FIELD: pointers})
  return {k: jnp.asarray(v) for k, v in rows.items()}


def test_routed_loss_is_token_loss_plus_weighted_route_nll():
  model = _model()
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  batch = _rows()
  tok_sum, w = trainer_lib.token_loss(graphdef, params, batch)
  total, w2 = route.routed_token_loss(graphdef, params, batch, layer=1, weight=0.7)
  assert float(w2) == float(w) == 5.0
  # The route term by hand from the manual attention of each example alone.
  ref = 0.0
  for tokens, queries in (([3, 9, 4, 17, 8, 2], {2: 1, 3: 2}), ([5, 6, 7, 8], {1: 0})):
    att = _manual_attention(model, jnp.asarray([tokens]), jnp.arange(len(tokens))[None], 1)
    for qpos, key in queries.items():
      ref += -np.mean(np.log(att[0, :, qpos, key]))
  np.testing.assert_allclose(float(total), float(tok_sum) + 0.7 * ref, rtol=1e-5)
  stats = route.make_diagnostics(graphdef, layer=1)(params, batch)
  np.testing.assert_allclose([float(stats[2]), float(stats[3])], [ref, 3.0], rtol=1e-5)
  # The first routed query of each example (positions 2 and 1) predicts its first number:
  # its NLL and probability from the model's full softmax over each example alone.
  nll, prob = 0.0, 0.0
  for tokens, q in (([3, 9, 4, 17, 8, 2], 2), ([5, 6, 7, 8], 1)):
    logits, _ = model(jnp.asarray([tokens]), jnp.arange(len(tokens))[None])
    lp = jax.nn.log_softmax(np.asarray(logits[0, q], np.float64))[tokens[q + 1]]
    nll, prob = nll - lp, prob + np.exp(lp)
  np.testing.assert_allclose([float(s) for s in stats[5:]], [nll, 2.0, prob], rtol=1e-5)


def test_first_routed_query_of_each_packed_example():
  route_ = jnp.asarray([[-1, 4, 5, -1, -1, 9, 8, -1, 3, -1],
                        [-1, -1, -1, 2, -1, -1, -1, -1, -1, -1]])
  segs = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 3, 3, 0],
                      [1, 1, 2, 2, 2, 3, 3, 3, 0, 0]])
  first = np.asarray(route.first_routed(route_, segs))
  assert np.flatnonzero(first[0]).tolist() == [1, 5, 8]
  assert np.flatnonzero(first[1]).tolist() == [3]


def test_a_step_on_the_route_loss_raises_attention_on_the_targets():
  model = _model()
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  batch = _rows()
  stats = jax.jit(route.make_diagnostics(graphdef, layer=1))
  loss = functools.partial(route.routed_token_loss, layer=1, weight=10.0)
  tx = optax.sgd(0.5)
  before = float(stats(params, batch)[4]) / 3
  grads = jax.grad(lambda p: loss(graphdef, p, batch)[0])(params)
  params = optax.apply_updates(params, tx.update(grads, tx.init(params))[0])
  after = float(stats(params, batch)[4]) / 3
  assert after > before + 0.01, (before, after)


def test_layer_and_group_checks():
  cfg = qwen3.get_model_config("tiny", num_layers=4)
  assert route.resolve_layer(cfg, -1, 2) == 3
  assert route.resolve_layer(cfg, 2, 2) == 2
  with pytest.raises(UserError, match="route_layer 1 must be a trained layer"):
    route.resolve_layer(cfg, 1, 2)
  with pytest.raises(UserError, match="route_group 2"):
    route.check_group(cfg, 2)
