"""k-means (jitted Lloyd iterations) and RQ-KMeans, the training-free residual tokenizer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gr2_jax.errors import UserError


def sq_distances(x, c):
  """[N, d], [K, d] -> squared Euclidean distances [N, K]."""
  return (jnp.sum(x * x, -1, keepdims=True) - 2.0 * x @ c.T + jnp.sum(c * c, -1)[None])


def kmeans_plus_plus(key, x, k):
  """k-means++ seeding: each new centre drawn with probability proportional to D^2."""
  n = x.shape[0]
  key, first = jax.random.split(key)
  first_pick = jax.random.randint(first, (), 0, n)
  centres = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first_pick])
  d2 = jnp.sum((x - centres[0]) ** 2, -1)

  def body(i, carry):
    centres, d2, key = carry
    key, sub = jax.random.split(key)
    # All-zero D^2 (fewer distinct points than centres) falls back to uniform.
    logits = jnp.where(d2.sum() > 0, jnp.log(jnp.maximum(d2, 1e-30)), jnp.zeros_like(d2))
    pick = jax.random.categorical(sub, logits)
    centres = centres.at[i].set(x[pick])
    d2 = jnp.minimum(d2, jnp.sum((x - x[pick]) ** 2, -1))
    return centres, d2, key

  centres, _, _ = jax.lax.fori_loop(1, k, body, (centres, d2, key))
  return centres


@functools.partial(jax.jit, static_argnames=("k", "iters", "init"))
def kmeans(key, x, k, iters=20, init="kmeans++"):
  """Lloyd's k-means -> (centroids [k, d], assignment [N]); empty clusters keep their centre."""
  if init == "kmeans++":
    centres = kmeans_plus_plus(key, x, k)
  elif init == "random":
    centres = x[jax.random.choice(key, x.shape[0], (k,), replace=x.shape[0] < k)]
  else:
    raise ValueError(f"unknown k-means init {init!r}")

  def step(_, centres):
    assign = jnp.argmin(sq_distances(x, centres), -1)
    onehot = jax.nn.one_hot(assign, k, dtype=x.dtype)
    counts = onehot.sum(0)
    sums = onehot.T @ x
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], centres)

  centres = jax.lax.fori_loop(0, iters, step, centres)
  return centres, jnp.argmin(sq_distances(x, centres), -1)


def residual_kmeans(key, x, num_levels, k, iters=20, init="kmeans++"):
  """RQ-KMeans: k-means on x, then on the residuals, `num_levels` times.

  Returns (codebooks [L, k, d], codes [N, L] int32, reconstruction [N, d]).
  """
  x = jnp.asarray(x, jnp.float32)
  if x.shape[0] < k:
    raise UserError(f"catalogue of {x.shape[0]} items is smaller than the codebook size {k}; "
                    "lower sids codebook_size")
  residual = x
  books, codes = [], []
  for key_l in jax.random.split(key, num_levels):
    centres, assign = kmeans(key_l, residual, k, iters, init)
    books.append(centres)
    codes.append(assign)
    residual = residual - centres[assign]
  return (jnp.stack(books), np.asarray(jnp.stack(codes, 1), np.int32), x - residual)
