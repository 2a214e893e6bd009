"""A PRM-style listwise re-ranker (Pei et al., 2019) in Flax NNX.

Each candidate's input is the sum of projections of its item-text embedding, its hand-made
features (`rankers.features`, standardised with the training slates' statistics), the pooled
user representation (recency-weighted mean of the recent history's item embeddings), their
element-wise product, and a learned embedding of its slot in the incoming (legacy) order. A
transformer encoder over the K candidates (no mask: every candidate sees the whole slate) and a
linear head give one score per candidate. The loss is the listwise softmax cross-entropy on the
multi-positive labels (`rax.softmax_loss`: -sum_i y_i log softmax(s)_i, one term per positive);
slates without a positive get weight 0 and are counted. Training goes through the project's
trainer (`train.trainer.Trainer` with an `Objective`): checkpoints, exact resume, logging.
"""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import rax

from gr2_jax.train import trainer as trainer_lib

FIELDS = ("features", "slate", "history", "labels", "weight")


@dataclasses.dataclass(frozen=True)
class PRMConfig:
  num_features: int
  embed_dim: int  # item embedding width
  slate_size: int
  dim: int = 64
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 128
  history: int = 10  # recent history items pooled into the user representation
  decay: float = 0.9  # weight of the k-th most recent of them: decay ** k


class EncoderLayer(nnx.Module):
  """Pre-LayerNorm self-attention over the slate + feed-forward."""

  def __init__(self, cfg, rngs):
    self.norm1 = nnx.LayerNorm(cfg.dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=cfg.num_heads, in_features=cfg.dim,
                                       decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(cfg.dim, rngs=rngs)
    self.ff1 = nnx.Linear(cfg.dim, cfg.mlp_dim, rngs=rngs)
    self.ff2 = nnx.Linear(cfg.mlp_dim, cfg.dim, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.ff2(jax.nn.gelu(self.ff1(self.norm2(x))))


class PRM(nnx.Module):

  def __init__(self, cfg: PRMConfig, *, rngs):
    self.cfg = cfg
    e, d = cfg.embed_dim, cfg.dim
    self.item = nnx.Linear(e, d, rngs=rngs)
    self.user = nnx.Linear(e, d, rngs=rngs)
    self.match = nnx.Linear(e, d, rngs=rngs)
    self.feats = nnx.Linear(cfg.num_features, d, rngs=rngs)
    self.slot = nnx.Embed(cfg.slate_size, d, rngs=rngs)
    self.layers = nnx.List([EncoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
    self.norm = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, 1, rngs=rngs)

  def __call__(self, features, item_emb, user_emb):
    """features [B, K, F], item_emb [B, K, E], user_emb [B, E] -> scores [B, K]."""
    k = features.shape[1]
    x = (self.item(item_emb) + self.feats(features) + self.user(user_emb)[:, None, :]
         + self.match(item_emb * user_emb[:, None, :]) + self.slot(jnp.arange(k))[None])
    for layer in self.layers:
      x = layer(x)
    return self.head(self.norm(x))[..., 0]


def user_embedding(table, history, cfg):
  """Recency-weighted mean [B, E] of the last `cfg.history` items' embeddings (-1 pads);
  zero for an empty history."""
  h = history[:, -cfg.history:]
  valid = h >= 0
  age = jnp.arange(h.shape[1])[::-1]
  w = jnp.where(valid, cfg.decay ** age, 0.0)
  pooled = (table[jnp.maximum(h, 0)] * w[..., None]).sum(1)
  return pooled / jnp.maximum(w.sum(1, keepdims=True), 1e-9)


def scores(model, table, batch):
  """Scores [B, K] of a batch {features, slate, history}."""
  return model(batch["features"], table[batch["slate"]],
               user_embedding(table, batch["history"], model.cfg))


def flops_per_slate(cfg):
  """Training FLOPs of one slate (forward + 2x backward) over the matmuls."""
  k, e, d, f, m = cfg.slate_size, cfg.embed_dim, cfg.dim, cfg.num_features, cfg.mlp_dim
  embed = 2 * k * (2 * e * d + f * d) + 2 * e * d
  layer = 2 * k * (4 * d * d + 2 * d * m) + 2 * 2 * k * k * d
  return 3 * (embed + cfg.num_layers * layer + 2 * k * d)


def objective(table, cfg):
  """The trainer `Objective`: summed softmax losses of the slates with a positive, their count.

  `table` (the item-text embeddings [N, E]) is a constant of the step, not a parameter.
  """
  table = jnp.asarray(table, jnp.float32)

  def loss(graphdef, params, batch):
    model = nnx.merge(graphdef, params)
    s = scores(model, table, batch)
    per_slate = rax.softmax_loss(s, batch["labels"], reduce_fn=None)
    w = batch["weight"]
    return jnp.sum(per_slate * w), jnp.sum(w)

  return trainer_lib.Objective(
      loss=loss, fields=FIELDS, count=lambda b: int(np.asarray(b["weight"]).size),
      unit="slates", flops=lambda shape: flops_per_slate(cfg) * float(np.prod(shape[:2])))


class Standardizer:
  """Per-feature mean / std of the training slates; NaN (a missing field) becomes the mean."""

  def __init__(self, x):
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    ok = np.isfinite(flat)
    count = np.maximum(ok.sum(0), 1)  # an all-missing feature gets mean 0, std 1
    vals = np.where(ok, flat, 0.0)
    mean = vals.sum(0) / count
    sd = np.sqrt((np.where(ok, flat - mean, 0.0) ** 2).sum(0) / count)
    self.mean = mean.astype(np.float32)
    self.std = np.where(sd > 0, sd, 1.0).astype(np.float32)  # a constant feature becomes 0

  def __call__(self, x):
    z = (x - self.mean) / self.std
    return np.where(np.isfinite(z), z, 0.0).astype(np.float32)

  def to_dict(self):
    return {"mean": self.mean.tolist(), "std": self.std.tolist()}

  @classmethod
  def from_dict(cls, d):
    out = cls.__new__(cls)
    out.mean = np.asarray(d["mean"], np.float32)
    out.std = np.asarray(d["std"], np.float32)
    return out


def rows(features, slates, labels, history):
  """Training rows {field: [N, ...]} for `trainer.batch_dataset`; weight 0 on slates without a
  positive. `features` are already standardised."""
  h = np.asarray(slates["history"])[:, -history:]
  if h.shape[1] < history:
    h = np.concatenate([np.full((len(h), history - h.shape[1]), -1, h.dtype), h], axis=1)
  return {"features": features.astype(np.float32),
          "slate": np.asarray(slates["slate"], np.int32),
          "history": h.astype(np.int32),
          "labels": labels.astype(np.float32),
          "weight": (labels > 0).any(1).astype(np.float32)}


def predict(model, table, rows_, batch_size=1024):
  """Scores [N, K] of `rows` (from `rows`), in batches of one compiled shape."""
  table = jnp.asarray(table, jnp.float32)
  graphdef, state = nnx.split(model)

  @jax.jit
  def apply(state, batch):
    return scores(nnx.merge(graphdef, state), table, batch)

  n = len(rows_["slate"])
  out = []
  for i in range(0, n, batch_size):
    b = {k: rows_[k][i:i + batch_size] for k in ("features", "slate", "history")}
    pad = batch_size - len(b["slate"])
    if pad:
      b = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in b.items()}
    out.append(np.asarray(apply(state, b))[:batch_size - pad])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
