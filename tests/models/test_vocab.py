"""Tests for vocabulary extension and the new-rows-only gradient mask."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from gr2_jax.models import qwen3
from gr2_jax.models import vocab
from gr2_jax.parallel import mesh as mesh_lib


def _model(tie):
  cfg = qwen3.get_model_config("tiny", num_layers=1, vocab_size=64, tie_embeddings=tie)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.RandomState(0)
  state = jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape), jnp.float32), state)
  return nnx.merge(graphdef, state)


def test_new_rows_start_at_mean_plus_scaled_noise_and_old_rows_stay():
  model = _model(tie=False)
  emb = np.asarray(model.embed_tokens.embedding[...])
  head = np.asarray(model.lm_head.kernel[...])
  mesh = mesh_lib.make_mesh((2, 2, 2), jax.devices()[:8])
  grown = vocab.extend_vocab(model, 2000, rng=jax.random.key(1), mesh=mesh)
  assert grown.cfg.vocab_size == 2064
  new_emb = np.asarray(grown.embed_tokens.embedding[...])
  new_head = np.asarray(grown.lm_head.kernel[...])
  assert new_emb.shape == (2064, 64) and new_head.shape == (64, 2064)
  np.testing.assert_array_equal(new_emb[:64], emb)
  np.testing.assert_array_equal(new_head[:, :64], head)
  # Over 2000 new rows the sample mean / std per dimension approach mean and 0.1 * std.
  rows = new_emb[64:]
  np.testing.assert_allclose(rows.mean(0), emb.mean(0), atol=4 * 0.1 * emb.std(0).max() / 44)
  np.testing.assert_allclose(rows.std(0), 0.1 * emb.std(0), rtol=0.1)
  np.testing.assert_allclose(new_head[:, 64:].std(1), 0.1 * head.std(1), rtol=0.1)
  assert np.abs(rows - new_head[:, 64:].T).max() > 0  # independent noise
  assert grown.embed_tokens.embedding[...].sharding.spec == P("tensor", "fsdp")
  assert grown.lm_head.kernel[...].sharding.spec == P("fsdp", "tensor")


def test_tied_model_grows_one_matrix_exactly_at_the_mean_without_noise():
  model = _model(tie=True)
  emb = np.asarray(model.embed_tokens.embedding[...])
  grown = vocab.extend_vocab(model, 3, rng=0, noise_scale=0.0)
  new_emb = np.asarray(grown.embed_tokens.embedding[...])
  assert not hasattr(grown, "lm_head")
  np.testing.assert_allclose(new_emb[64:], np.broadcast_to(emb.mean(0), (3, 64)), atol=1e-6)


def test_mask_and_optax_transform_freeze_everything_but_new_rows():
  model = vocab.extend_vocab(_model(tie=False), 4, rng=0)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  masks = vocab.new_rows_mask(params, 64)
  emb_mask = np.asarray(masks["embed_tokens"]["embedding"])
  head_mask = np.asarray(masks["lm_head"]["kernel"])
  np.testing.assert_array_equal(emb_mask[:64], 0)
  np.testing.assert_array_equal(emb_mask[64:], 1)
  np.testing.assert_array_equal(head_mask[:, :64], 0)
  np.testing.assert_array_equal(head_mask[:, 64:], 1)
  assert np.asarray(masks["layers"][0]["mlp"]["up_proj"]["kernel"]).max() == 0
  assert np.asarray(masks["norm"]["weight"]).max() == 0

  # Adam with weight decay, mask chained last: only new rows move, even under weight decay.
  tx = optax.chain(optax.adamw(1e-2, weight_decay=0.1), vocab.train_new_rows_only(64))
  grads = jax.tree.map(jnp.ones_like, params)

  @jax.jit
  def step(params, grads):
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)

  before = jax.tree.map(np.asarray, params)
  after = step(params, grads)
  for (path, b), a in zip(jax.tree_util.tree_flatten_with_path(before)[0],
                          jax.tree.leaves(after)):
    a = np.asarray(a)
    names = str(path)
    if "embed_tokens" in names:
      np.testing.assert_array_equal(a[:64], b[:64])
      assert np.all(a[64:] != b[64:])
    elif "lm_head" in names:
      np.testing.assert_array_equal(a[:, :64], b[:, :64])
      assert np.all(a[:, 64:] != b[:, 64:])
    else:
      np.testing.assert_array_equal(a, b, err_msg=names)
