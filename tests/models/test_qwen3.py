"""Tests for the Qwen3 model: cache semantics, packed segments, RoPE, the LM head at chosen
positions, chunked log-probs, parameter counts."""

import functools

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gr2_jax.errors import UserError
from gr2_jax.models import qwen3


@functools.lru_cache(maxsize=None)
def _tiny(tie=True, **overrides):
  """Tiny model with random weights drawn on the host (norm scales too), no init compile."""
  cfg = qwen3.get_model_config("tiny", tie_embeddings=tie, **overrides)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.RandomState(0)

  def draw(x):
    scale = 0.1 if x.ndim == 1 else 0.2 / np.sqrt(x.shape[0])
    base = 1.0 if x.ndim == 1 else 0.0
    return jnp.asarray(base + scale * rng.randn(*x.shape), jnp.float32)

  return cfg, graphdef, jax.tree.map(draw, state)


_apply = jax.jit(qwen3.apply, static_argnums=0)


def _padded(rows, width):
  """Right-pads token lists: tokens, positions, segment_ids."""
  tokens = np.zeros((len(rows), width), np.int32)
  seg = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
    seg[i, :len(r)] = 1
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape).copy()
  return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(seg)


def test_prefill_then_decode_matches_full_recompute():
  cfg, graphdef, state = _tiny()
  rng = np.random.RandomState(1)
  lengths = [5, 3, 7, 1]
  prompts = [list(rng.randint(1, cfg.vocab_size, n)) for n in lengths]
  steps = 3
  new_tokens = rng.randint(1, cfg.vocab_size, (len(prompts), steps))

  tokens, positions, seg = _padded(prompts, 7)
  cache = qwen3.init_cache(cfg, len(prompts), 16)
  prefill, cache = _apply(graphdef, state, tokens, positions, segment_ids=seg, cache=cache)
  np.testing.assert_array_equal(cache["end"], lengths)
  decoded = []
  for j in range(steps):
    pos = jnp.asarray(np.array(lengths) + j, jnp.int32)[:, None]
    step_logits, cache = _apply(graphdef, state, jnp.asarray(new_tokens[:, j:j + 1]), pos,
                                cache=cache)
    decoded.append(step_logits[:, 0])
  np.testing.assert_array_equal(cache["end"], np.array(lengths) + steps)

  full_rows = [p + list(new_tokens[i]) for i, p in enumerate(prompts)]
  tokens, positions, seg = _padded(full_rows, 7 + steps)
  full, _ = _apply(graphdef, state, tokens, positions, segment_ids=seg)
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(prefill[i, :n], full[i, :n], atol=1e-5, rtol=1e-5)
    for j in range(steps):
      np.testing.assert_allclose(decoded[j][i], full[i, n + j], atol=1e-5, rtol=1e-5)


def test_packed_segments_do_not_attend_to_each_other():
  cfg, graphdef, state = _tiny(tie=False)
  rng = np.random.RandomState(2)
  a = list(rng.randint(1, cfg.vocab_size, 5))
  b = list(rng.randint(1, cfg.vocab_size, 4))
  packed = jnp.asarray([a + b + [0]], jnp.int32)
  positions = jnp.asarray([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0]], jnp.int32)
  seg = jnp.asarray([[1] * 5 + [2] * 4 + [0]], jnp.int32)
  out, _ = _apply(graphdef, state, packed, positions, segment_ids=seg)
  # Each sequence alone (right padding is invisible to earlier tokens under the causal mask).
  tokens, positions_alone, _ = _padded([a, b], 5)
  alone, _ = _apply(graphdef, state, tokens, positions_alone)
  np.testing.assert_allclose(out[0, :5], alone[0], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out[0, 5:9], alone[1, :4], atol=1e-5, rtol=1e-5)
  # With one segment the second sequence sees the first one, so its logits differ.
  mixed, _ = _apply(graphdef, state, packed, positions, segment_ids=jnp.ones_like(seg))
  assert np.abs(mixed[0, 5:9] - alone[1, :4]).max() > 1e-3


def test_rope_matches_rotate_half_formula():
  d, theta = 8, 10000.0
  x = jnp.asarray(np.random.RandomState(3).randn(1, 2, 1, d), jnp.float32)
  positions = jnp.asarray([[0, 3]], jnp.int32)
  cos, sin = qwen3.rope_tables(positions, d, theta)
  out = np.asarray(qwen3.apply_rope(x, cos, sin))
  np.testing.assert_allclose(out[0, 0], x[0, 0], atol=1e-6)  # position 0: identity
  # Pair (i, i + d/2) at position p rotates by angle p * theta^(-2i/d).
  xv = np.asarray(x[0, 1, 0])
  for i in range(d // 2):
    angle = 3 * theta ** (-2 * i / d)
    c, s = np.cos(angle), np.sin(angle)
    np.testing.assert_allclose(out[0, 1, 0, i], xv[i] * c - xv[i + d // 2] * s, atol=1e-5)
    np.testing.assert_allclose(out[0, 1, 0, i + d // 2], xv[i + d // 2] * c + xv[i] * s,
                               atol=1e-5)


def test_bf16_compute_is_close_to_fp32_and_returns_fp32_logits():
  cfg, graphdef, state = _tiny()
  bf16_graphdef, _ = nnx.split(nnx.eval_shape(
      lambda: qwen3.Qwen3(qwen3.get_model_config("tiny", dtype="bfloat16"),
                          rngs=nnx.Rngs(0))))
  tokens, positions, seg = _padded([[5, 6, 7, 8]], 4)
  ref, _ = _apply(graphdef, state, tokens, positions)
  out, _ = _apply(bf16_graphdef, state, tokens, positions)
  assert out.dtype == jnp.float32
  assert np.abs(np.asarray(out) - np.asarray(ref)).max() < 0.05 * np.abs(ref).max()


def test_remat_checkpoints_each_layer_in_the_backward_pass():
  """remat=True wraps every layer in a rematerialisation (checked on the traced program)."""
  tokens = jnp.zeros((1, 4), jnp.int32)

  def remat_count(remat):
    cfg = qwen3.get_model_config("tiny", vocab_size=64, remat=remat)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))))
    loss = lambda st: jnp.sum(qwen3.apply(graphdef, st, tokens, tokens)[0])
    jaxpr = jax.make_jaxpr(jax.grad(loss))(state)
    return sum(e.primitive.name.startswith(("remat", "checkpoint")) for e in jaxpr.jaxpr.eqns)

  assert remat_count(False) == 0
  assert remat_count(True) == 2  # one per layer of the tiny model



@pytest.mark.parametrize("tie", [True, False])
def test_hidden_then_logits_is_the_call(tie):
  cfg, graphdef, state = _tiny(tie)
  tokens, positions, seg = _padded([[5, 6, 7, 8], [9, 10]], 4)
  want, _ = _apply(graphdef, state, tokens, positions, segment_ids=seg)

  @jax.jit
  def two_steps(state, tokens, positions, seg):
    model = nnx.merge(graphdef, state)
    hidden, _ = model.hidden(tokens, positions, segment_ids=seg)
    return hidden, model.logits(hidden[:, 1:3])

  hidden, got = two_steps(state, tokens, positions, seg)
  assert hidden.shape == (2, 4, cfg.hidden_size)
  np.testing.assert_allclose(got, want[:, 1:3], rtol=1e-6, atol=1e-6)


def _reference_logps(graphdef, state, tokens, positions, seg, targets, temperature):
  """The unchunked computation: full [B, T, V] logits, then log_softmax."""
  logits, _ = qwen3.apply(graphdef, state, tokens, positions, segment_ids=seg)
  logp = jax.nn.log_softmax(logits / temperature, axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("tie,chunk,temperature", [
    (True, 4, 1.0), (False, 3, 1.0), (True, 5, 0.7), (False, 64, 1.0), (True, 0, 1.0)])
def test_chunked_token_logps_equal_unchunked_values_and_gradients(tie, chunk, temperature):
  """T = 9: chunks of 3 divide it, 4 and 5 leave a padded last chunk, 64 and 0 are one chunk."""
  cfg, graphdef, state = _tiny(tie)
  rng = np.random.RandomState(2)
  tokens, positions, seg = _padded([list(rng.randint(1, cfg.vocab_size, 9)),
                                    list(rng.randint(1, cfg.vocab_size, 6))], 9)
  targets = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 9)), jnp.int32)
  weights = jnp.asarray(rng.rand(2, 9), jnp.float32) * seg

  def ref(st):
    return _reference_logps(graphdef, st, tokens, positions, seg, targets, temperature)

  def chunked(st):
    return qwen3.token_logps(graphdef, st, tokens, positions, targets, segment_ids=seg,
                             chunk=chunk, temperature=temperature)

  np.testing.assert_allclose(jax.jit(chunked)(state), jax.jit(ref)(state), rtol=1e-5,
                             atol=1e-5)
  loss = lambda f: jax.jit(jax.grad(lambda st: jnp.sum(f(st) * weights)))(state)
  want, got = loss(ref), loss(chunked)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=str(path))
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want)) > 1e-3  # not vacuous


def test_chunked_token_logps_hold_one_chunk_of_logits():
  """Forward and backward: the only arrays with a vocabulary axis are the embedding (and its
  gradient) and one chunk of logits [B, chunk, V], never [B, T, V]."""
  cfg, graphdef, state = _tiny(True, vocab_size=96)
  tokens = jnp.zeros((2, 12), jnp.int32)
  fn = lambda st: jnp.sum(qwen3.token_logps(graphdef, st, tokens, tokens, tokens, chunk=4))
  shapes = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      shapes.update(v.aval.shape for v in eqn.outvars
                    if cfg.vocab_size in getattr(v.aval, "shape", ()))
      for sub in jax_core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(jax.grad(fn))(state).jaxpr)
  assert shapes == {(2, 4, cfg.vocab_size), (cfg.vocab_size, cfg.hidden_size)}

# (total, non-embedding) in billions as rounded on the Qwen3 model cards.
PUBLISHED = {
    "qwen3-0.6b": ((0.6, 1), (0.44, 2)),
    "qwen3-1.7b": ((1.7, 1), (1.4, 1)),
    "qwen3-4b": ((4.0, 1), (3.6, 1)),
    "qwen3-8b": ((8.2, 1), (6.95, 2)),
    "qwen3-14b": ((14.8, 1), (13.2, 1)),
    "qwen3-32b": ((32.8, 1), (31.2, 1)),
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_real_preset_parameter_counts_match_model_cards(preset):
  cfg = qwen3.get_model_config(preset)
  abstract = nnx.eval_shape(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0)))
  total, non_embedding = qwen3.param_counts(abstract)
  (want_total, digits_total), (want_ne, digits_ne) = PUBLISHED[preset]
  assert round(total / 1e9, digits_total) == want_total
  assert round(non_embedding / 1e9, digits_ne) == want_ne


def test_tiny_parameter_count_by_hand():
  cfg = qwen3.get_model_config("tiny")
  abstract = nnx.eval_shape(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0)))
  e, h, kvh, d, m, v = 64, 4, 2, 16, 128, 512
  per_layer = e * h * d * 2 + e * kvh * d * 2 + 3 * e * m + 2 * e + 2 * d
  assert qwen3.param_counts(abstract) == (v * e + 2 * per_layer + e, 2 * per_layer + e)


def test_without_qk_norm_the_norm_parameters_are_absent_and_counted_by_hand():
  cfg = qwen3.get_model_config("tiny", qk_norm=False)
  abstract = nnx.eval_shape(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0)))
  assert not hasattr(abstract.layers[0].self_attn, "q_norm")
  assert not hasattr(abstract.layers[0].self_attn, "k_norm")
  e, h, kvh, d, m, v = 64, 4, 2, 16, 128, 512
  per_layer = e * h * d * 2 + e * kvh * d * 2 + 3 * e * m + 2 * e
  assert qwen3.param_counts(abstract) == (v * e + 2 * per_layer + e, 2 * per_layer + e)
  tokens, positions, _ = _padded([[5, 6, 7, 8]], 4)
  cfg, graphdef, state = _tiny(qk_norm=False)
  logits, _ = _apply(graphdef, state, tokens, positions)
  assert logits.shape == (1, 4, cfg.vocab_size) and np.isfinite(logits).all()


def test_smollm2_preset_has_the_published_135m_parameters():
  cfg = qwen3.get_model_config("smollm2-135m")
  abstract = nnx.eval_shape(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0)))
  per_layer = 576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536 + 2 * 576
  assert qwen3.param_counts(abstract)[0] == 49152 * 576 + 30 * per_layer + 576 == 134_515_008


def test_get_model_config_errors():
  with pytest.raises(UserError, match="qwen3-0.6b"):
    qwen3.get_model_config("qwen9")
  with pytest.raises(UserError, match="hidden"):
    qwen3.get_model_config("tiny", hidden=3)
  with pytest.raises(UserError, match="num_kv_heads"):
    qwen3.get_model_config("tiny", num_kv_heads=3)
  assert qwen3.get_model_config("demo", vocab_size=9000).vocab_size == 9000
