"""SASRec, the legacy ranker: a causal self-attention next-item model (Kang & McAuley, 2018).

It is trained on the legacy period only and scores the whole catalogue; its top-K for an
example is the slate GR2 re-ranks, in SASRec's own order. Item i is token i + 1; 0 pads.
"""

import dataclasses
import functools
import time

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from gr2_jax.parallel import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
  num_items: int
  max_len: int = 50
  dim: int = 64
  num_blocks: int = 2
  num_heads: int = 1
  dropout: float = 0.2


class Block(nnx.Module):
  """Pre-LayerNorm causal self-attention + point-wise feed-forward."""

  def __init__(self, cfg, rngs):
    self.norm1 = nnx.LayerNorm(cfg.dim, rngs=rngs)
    self.qkv = nnx.Linear(cfg.dim, 3 * cfg.dim, rngs=rngs)
    self.out = nnx.Linear(cfg.dim, cfg.dim, rngs=rngs)
    self.num_heads = cfg.num_heads
    self.norm2 = nnx.LayerNorm(cfg.dim, rngs=rngs)
    self.ff1 = nnx.Linear(cfg.dim, cfg.dim, rngs=rngs)
    self.ff2 = nnx.Linear(cfg.dim, cfg.dim, rngs=rngs)
    self.drop = nnx.Dropout(cfg.dropout, rngs=rngs)

  def attention(self, x, mask):
    b, l, d = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(b, l, 3 * self.num_heads, -1), 3, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(x.dtype)
    probs = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
    return self.out(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, l, d))

  def __call__(self, x, mask, deterministic):
    x = x + self.drop(self.attention(self.norm1(x), mask), deterministic=deterministic)
    h = self.ff2(self.drop(jax.nn.relu(self.ff1(self.norm2(x))), deterministic=deterministic))
    return x + self.drop(h, deterministic=deterministic)


class SASRec(nnx.Module):

  def __init__(self, cfg, *, rngs):
    self.cfg = cfg
    self.item_emb = nnx.Embed(cfg.num_items + 1, cfg.dim, rngs=rngs)
    self.pos_emb = nnx.Embed(cfg.max_len, cfg.dim, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_blocks)])
    self.norm = nnx.LayerNorm(cfg.dim, rngs=rngs)
    self.drop = nnx.Dropout(cfg.dropout, rngs=rngs)

  def __call__(self, seq, deterministic=True):
    """seq: int32 [B, L] of item tokens, right-aligned, 0 = padding. Returns [B, L, D]."""
    valid = seq > 0
    x = self.item_emb(seq) * (self.cfg.dim ** 0.5) + self.pos_emb(jnp.arange(seq.shape[1]))
    x = self.drop(x, deterministic=deterministic) * valid[..., None]
    causal = jnp.tril(jnp.ones((seq.shape[1], seq.shape[1]), bool))
    mask = (causal[None] & valid[:, None, :])[:, None]  # [B, 1, L, L]
    for block in self.blocks:
      x = block(x, mask, deterministic) * valid[..., None]
    return self.norm(x)

  def scores(self, seq):
    """Scores of every item (index i = item i) after the last position: [B, num_items]."""
    h = self(seq)[:, -1]
    return h @ self.item_emb.embedding[...][1:].T


def _loss(model, x, y, negatives):
  """Softmax cross-entropy of each next item against the full catalogue (negatives empty) or
  against a shared set of uniformly sampled negatives (sampled softmax, accidental hits masked)."""
  h = model(x, deterministic=False)  # [B, L, D]
  table = model.item_emb.embedding[...]
  if negatives.shape[0] == 0:
    logits = (h @ table.T).at[..., 0].set(-1e9)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  else:
    pos = jnp.einsum("bld,bld->bl", h, table[y])
    neg = h @ table[negatives].T  # [B, L, S]
    neg = jnp.where(negatives[None, None, :] == y[..., None], -1e9, neg)
    ce = jax.nn.logsumexp(jnp.concatenate([pos[..., None], neg], -1), -1) - pos
  w = (y > 0).astype(jnp.float32)
  return (ce * w).sum() / jnp.maximum(w.sum(), 1.0)


@nnx.jit
def _train_step(model, optimizer, x, y, negatives):
  loss, grads = nnx.value_and_grad(_loss)(model, x, y, negatives)
  optimizer.update(model, grads)
  return loss


@functools.partial(nnx.jit, static_argnames="k")
def _rank_and_top_k(model, seq, excluded, targets, popularity, k):
  """Scores all items, drops excluded ones (-1 = none), and returns the top k with scores and
  the 0-based full-catalogue rank of the target under SASRec and under popularity."""
  rows = jnp.arange(seq.shape[0])[:, None]
  n = popularity.shape[0]
  excl = jnp.where(excluded < 0, n, excluded)

  def masked(scores):
    scores = jnp.concatenate([scores, jnp.zeros_like(scores[:, :1])], axis=1)
    return scores.at[rows, excl].set(-jnp.inf)[:, :n]

  def rank(scores):
    t = scores[rows[:, 0], targets]
    return (scores > t[:, None]).sum(1)

  scores = masked(model.scores(seq))
  pop = masked(jnp.broadcast_to(popularity, scores.shape))
  top_scores, top = jax.lax.top_k(scores, k)
  return top, top_scores, rank(scores), rank(pop)


def shuffle_ties(interactions, seed):
  """Interactions re-sorted by (user, timestamp, random key): items rated in the same second have
  no true order, and training on a fixed tie-break (item id, i.e. title order) teaches the model
  an order that evaluation histories, which stop before the target's timestamp, never show."""
  key = np.random.default_rng(seed).random(len(interactions["user"]))
  perm = np.lexsort((key, interactions["timestamp"], interactions["user"]))
  return {k: v[perm] for k, v in interactions.items()}


def _user_sequences(user, item, mask):
  """Per-user item-token arrays (item + 1) of the masked interactions, chronological."""
  user, item = user[mask], item[mask] + 1
  bounds = np.flatnonzero(np.diff(user)) + 1
  return [s for s in np.split(item, bounds) if s.size >= 2]


def sample_batch(seqs, batch_size, max_len, rng):
  """Random crops of length max_len + 1 from random users: inputs and next-item targets."""
  x = np.zeros((batch_size, max_len), np.int32)
  y = np.zeros((batch_size, max_len), np.int32)
  for b, u in enumerate(rng.integers(0, len(seqs), batch_size)):
    s = seqs[u]
    end = rng.integers(2, s.size + 1)
    crop = s[max(0, end - max_len - 1):end]
    x[b, max_len - crop.size + 1:] = crop[:-1]
    y[b, max_len - crop.size + 1:] = crop[1:]
  return x, y


def train(cfg, interactions, mask, *, steps, batch_size, learning_rate, num_negatives, seed,
          log_every=100, log_prefix="[legacy]"):
  """Trains SASRec on the masked (legacy-period) interactions; returns the model."""
  shuffled = shuffle_ties({**interactions, "mask": mask}, seed)
  seqs = _user_sequences(shuffled["user"], shuffled["item"], shuffled["mask"])
  model = SASRec(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(100, steps // 10),
                                                steps, learning_rate * 0.1)
  optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.0), wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  start, seen = time.time(), 0
  for step in range(1, steps + 1):
    x, y = sample_batch(seqs, batch_size, cfg.max_len, rng)
    negatives = rng.integers(1, cfg.num_items + 1, num_negatives).astype(np.int32)
    loss = _train_step(model, optimizer, jnp.asarray(x), jnp.asarray(y), jnp.asarray(negatives))
    seen += int((y > 0).sum())
    if step % log_every == 0 or step == steps:
      elapsed = time.time() - start
      logging.info("%s sasrec step %d/%d  loss %.4f  %.0f targets/s", log_prefix, step, steps,
                   float(loss), seen / max(elapsed, 1e-9))
  return model


def history_tokens(history, max_len):
  """Right-aligned item histories (-1 = pad) -> SASRec tokens of width max_len."""
  h = history[:, -max_len:]
  return np.where(h >= 0, h + 1, 0).astype(np.int32)


def rank_and_top_k(model, history, excluded, targets, popularity, k, batch_size=1024):
  """Batched `_rank_and_top_k` over right-aligned histories; returns numpy arrays."""
  tokens = history_tokens(history, model.cfg.max_len)
  pop = jnp.asarray(popularity)
  outs = []
  for i in range(0, len(tokens), batch_size):
    sl = slice(i, i + batch_size)
    parts = [tokens[sl], excluded[sl], targets[sl]]
    pad = batch_size - len(parts[0])
    if pad:  # one compiled shape for every batch
      parts = [np.concatenate([p, np.zeros((pad,) + p.shape[1:], p.dtype)]) for p in parts]
    out = _rank_and_top_k(model, *map(jnp.asarray, parts), pop, k)
    outs.append([np.asarray(o)[:batch_size - pad] for o in out])
  return [np.concatenate(col) for col in zip(*outs)]


def popularity_ranks(excluded, targets, popularity):
  """0-based full-catalogue rank of each target under popularity, excluded items (-1 = none)
  removed: `rank_and_top_k`'s popularity column without a SASRec."""
  pop = np.broadcast_to(np.asarray(popularity, np.float32), (len(targets), len(popularity)))
  pop = pop.copy()
  rows = np.arange(len(targets))[:, None]
  ok = excluded >= 0
  pop[np.broadcast_to(rows, excluded.shape)[ok], excluded[ok]] = -np.inf
  t = pop[np.arange(len(targets)), targets]
  return (pop > t[:, None]).sum(1)


def config_of(section, num_items):
  """SASRecConfig of a legacy config section (`configs/legacy.py`)."""
  return SASRecConfig(num_items=num_items, max_len=section.max_len, dim=section.dim,
                      num_blocks=section.num_blocks, num_heads=section.num_heads,
                      dropout=section.dropout)


def restore(path, cfg):
  """The SASRec saved at `path` (orbax, its nnx.Param state)."""
  with mesh_lib.outside_mesh():  # one device, also inside a model stage's runtime
    abstract = nnx.eval_shape(lambda: SASRec(cfg, rngs=nnx.Rngs(0)))
    # Onto this process's first device, whatever the topology the checkpoint was saved on.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nnx.state(abstract, nnx.Param))
    state = ocp.StandardCheckpointer().restore(path, target)
    model = SASRec(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, state)
  return model


def train_or_restore(path, cfg, interactions, mask, section, log_prefix="[legacy]"):
  """Restores the SASRec at `path`, or trains one on the masked interactions with the
  section's steps, batch size, learning rate, negatives and seed, and saves it there."""
  if os.path.isdir(path):
    logging.info("%s restoring SASRec from %s", log_prefix, path)
    return restore(path, cfg)
  model = train(cfg, interactions, mask, steps=section.steps, batch_size=section.batch_size,
                learning_rate=section.learning_rate, num_negatives=section.num_negatives,
                seed=section.seed, log_prefix=log_prefix)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, nnx.state(model, nnx.Param))
  checkpointer.wait_until_finished()
  return model


@nnx.jit
def _slate_scores(model, seq, slate):
  return jnp.take_along_axis(model.scores(seq), slate, axis=1)


def slate_scores(model, history, slate, batch_size=1024):
  """SASRec's scores [N, K] of the slate items after right-aligned histories (-1 = pad)."""
  tokens = history_tokens(history, model.cfg.max_len)
  out = []
  for i in range(0, len(tokens), batch_size):
    t, s = tokens[i:i + batch_size], np.asarray(slate[i:i + batch_size], np.int32)
    pad = batch_size - len(t)
    if pad:  # one compiled shape for every batch
      t = np.concatenate([t, np.zeros((pad,) + t.shape[1:], t.dtype)])
      s = np.concatenate([s, np.zeros((pad,) + s.shape[1:], s.dtype)])
    out.append(np.asarray(_slate_scores(model, jnp.asarray(t), jnp.asarray(s)))[:batch_size - pad])
  return np.concatenate(out) if out else np.zeros(np.shape(slate), np.float32)
