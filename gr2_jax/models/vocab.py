"""Growing the vocabulary (new embedding and LM-head rows) and training only the new rows.

New rows start at the mean of the existing rows plus small Gaussian noise scaled by the rows'
per-dimension std: a new token's logit then starts near the average logit, so adding tokens
barely moves the model's existing distribution, and the noise breaks the symmetry between them.

Training only the new rows (the warm-up before mid-training): chain the mask transform LAST, so
that it also cancels weight decay and momentum on every frozen parameter:

    tx = optax.chain(optax.adamw(lr, weight_decay=wd), vocab.train_new_rows_only(old_vocab))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

`new_rows_mask(grads, old_vocab)` gives the same mask as a pytree for code that scales
gradients itself (multiply gradients by it before the optimizer).
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gr2_jax.errors import UserError
from gr2_jax.models import qwen3
from gr2_jax.parallel import mesh as mesh_lib
from gr2_jax.parallel import sharding as sharding_lib


def _grow_rows(table, num_new, key, noise_scale):
  """Appends `num_new` rows to table [V, E]: mean + noise_scale * std * N(0, 1)."""
  table32 = table.astype(jnp.float32)
  mean = jnp.mean(table32, axis=0)
  std = jnp.std(table32, axis=0)
  noise = jax.random.normal(key, (num_new, table.shape[1]), jnp.float32)
  rows = mean + noise_scale * std * noise
  return jnp.concatenate([table, rows.astype(table.dtype)], axis=0)


def extend_vocab(model, num_new, *, rng, mesh=None, rules=None, noise_scale=0.1):
  """A copy of `model` with `num_new` more vocabulary rows (embedding and untied LM head).

  Args:
    model: a `qwen3.Qwen3`.
    num_new: number of tokens to add; they get ids old_vocab .. old_vocab + num_new - 1.
    rng: a JAX PRNG key (or an int seed) for the noise.
    mesh, rules: when `mesh` is given the result is sharded on it by `rules`.
    noise_scale: noise std as a fraction of the existing rows' per-dimension std.
  """
  if num_new < 0:
    raise UserError(f"cannot add a negative number of tokens ({num_new})")
  if isinstance(rng, int):
    rng = jax.random.key(rng)
  cfg = model.cfg
  new_cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + num_new)
  graphdef, abstract = mesh_lib.abstract_model(lambda: qwen3.Qwen3(new_cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(model))
  out_shardings = None
  if mesh is not None:
    out_shardings = nnx.to_pure_dict(sharding_lib.state_shardings(abstract, mesh, rules))

  def grow(params, key):
    emb_key, head_key = jax.random.split(key)
    params = dict(params)
    params["embed_tokens"] = {"embedding": _grow_rows(
        params["embed_tokens"]["embedding"], num_new, emb_key, noise_scale)}
    if not cfg.tie_embeddings:
      head = params["lm_head"]["kernel"]  # [E, V]
      params["lm_head"] = {"kernel": _grow_rows(head.T, num_new, head_key, noise_scale).T}
    return params

  if mesh is not None:
    with sharding_lib.use_rules(mesh, rules):
      params = jax.jit(grow, out_shardings=out_shardings)(params, rng)
  else:
    params = jax.jit(grow)(params, rng)
  nnx.replace_by_pure_dict(abstract, params)
  return nnx.merge(graphdef, abstract)


def _vocab_axis(path):
  """0 for the embedding [V, E], 1 for the LM head [E, V], None for other parameters."""
  names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
  if "embed_tokens" in names:
    return 0
  if "lm_head" in names:
    return 1
  return None


def new_rows_mask(tree, old_vocab):
  """Same-structured tree of 0/1 masks: 1 exactly on embedding/LM-head rows >= old_vocab."""

  def mask(path, x):
    axis = _vocab_axis(path)
    if axis is None:
      return jnp.zeros(x.shape, x.dtype)
    ids = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
    return (ids >= old_vocab).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(mask, tree)


def train_new_rows_only(old_vocab):
  """Optax transform zeroing updates everywhere but the new vocabulary rows (chain it last)."""

  def update(updates, state, params=None):
    del params
    masks = new_rows_mask(updates, old_vocab)
    return jax.tree.map(lambda u, m: u * m, updates, masks), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
