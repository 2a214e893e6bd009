"""Optimiser: AdamW with linear warm-up then cosine decay, global-norm clipping, row masks, and
frozen lower layers.

Freezing (`OptimConfig.frozen_layers` = N > 0) fixes the token embedding (with a tied LM head,
the head too) and decoder layers 0..N-1. Two halves make it pay: the loss sees those parameters
through `stop_frozen` (stop_gradient), so XLA drops the backward pass below layer N, and the
optimiser gives them `optax.set_to_zero` updates and no AdamW moments. An untied LM head, the
upper layers and the final norm train.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gr2_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW and learning-rate schedule settings."""
  learning_rate: float = 1e-3  # peak
  warmup_steps: int = 0
  total_steps: int = 1000  # the cosine reaches end_lr_ratio * learning_rate here
  end_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0  # 0 = no clipping
  frozen_layers: int = 0  # > 0: the embedding and decoder layers below this index stay fixed

  def __post_init__(self):
    if self.learning_rate <= 0:
      raise UserError(f"learning_rate={self.learning_rate} must be > 0")
    if self.total_steps < 1 or self.warmup_steps < 0:
      raise UserError(f"total_steps={self.total_steps} must be >= 1 and warmup_steps="
                      f"{self.warmup_steps} >= 0")
    if self.clip_norm < 0:
      raise UserError(f"clip_norm={self.clip_norm} must be >= 0 (0 turns clipping off)")
    if self.frozen_layers < 0:
      raise UserError(f"frozen_layers={self.frozen_layers} must be >= 0 (0 trains every layer)")


def lr_schedule(cfg: OptimConfig):
  """Step -> learning rate: 0 -> peak over warmup_steps, then cosine down to the end value."""
  warmup = min(cfg.warmup_steps, cfg.total_steps - 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(cfg.total_steps, warmup + 1),
      end_value=cfg.learning_rate * cfg.end_lr_ratio)


def _keys(path):
  """The keys of a pytree path, e.g. ["layers", 3, "mlp", "up_proj", "kernel"]."""
  return [getattr(k, "key", getattr(k, "name", k)) for k in path]


def _names(path):
  return {str(k) for k in _keys(path)}


def _decay_mask(params):
  """Weight decay on matrices only (not on norms' scales)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def _is_frozen(path, frozen_layers):
  keys = _keys(path)
  if "embed_tokens" in keys:
    return True
  if len(keys) > 1 and keys[0] == "layers":
    return int(keys[1]) < frozen_layers
  return False


def frozen_mask(params, frozen_layers):
  """Bool tree over `params`: True where `frozen_layers` freezes the parameter."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: frozen_layers > 0 and _is_frozen(path, frozen_layers), params)


def check_frozen_layers(params, frozen_layers):
  n = len(params.get("layers", {}))
  if frozen_layers > n:
    raise UserError(f"frozen_layers={frozen_layers} but the model has {n} decoder layers "
                    f"(use 0..{n})")


def stop_frozen(params, frozen_layers):
  """`params` with stop_gradient on the frozen ones (identity when frozen_layers is 0)."""
  if frozen_layers <= 0:
    return params
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jax.lax.stop_gradient(x) if _is_frozen(path, frozen_layers) else x, params)


def vocab_rows_mask(tree, row_ids, vocab_size):
  """0/1 tree: 1 on the embedding / LM-head rows listed in `row_ids`, 0 everywhere else."""
  rows = np.zeros((vocab_size,), np.float32)
  rows[np.asarray(row_ids, np.int64)] = 1.0

  def mask(path, x):
    names = _names(path)
    if "embed_tokens" in names and x.ndim == 2 and x.shape[0] == vocab_size:
      return jnp.asarray(rows, x.dtype)[:, None] * jnp.ones_like(x)
    if "lm_head" in names and x.ndim == 2 and x.shape[1] == vocab_size:
      return jnp.asarray(rows, x.dtype)[None, :] * jnp.ones_like(x)
    return jnp.zeros_like(x)

  return jax.tree_util.tree_map_with_path(mask, tree)


def train_rows_only(row_ids, vocab_size):
  """Optax transform zeroing every update but those of the given vocabulary rows (chain last).

  Chained after AdamW it also cancels weight decay on every frozen parameter, so the frozen
  weights stay bit-for-bit unchanged.
  """
  row_ids = np.unique(np.asarray(row_ids, np.int64))
  if row_ids.size == 0 or row_ids.min() < 0 or row_ids.max() >= vocab_size:
    raise UserError(f"trainable rows must be non-empty ids in [0, {vocab_size})")

  def update(updates, state, params=None):
    del params
    masks = vocab_rows_mask(updates, row_ids, vocab_size)
    return jax.tree.map(lambda u, m: u * m, updates, masks), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: OptimConfig, *, trainable_rows=None, vocab_size=None):
  """clip -> AdamW(schedule) [-> train only `trainable_rows` of the vocabulary]; with
  `cfg.frozen_layers` the frozen parameters get zero updates and no AdamW state instead."""
  parts = []
  if cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  adamw = optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=_decay_mask)
  if cfg.frozen_layers > 0:
    if trainable_rows is not None:
      raise UserError("frozen_layers and trainable vocabulary rows cannot be combined")

    def labels(params):
      return jax.tree.map(lambda f: "frozen" if f else "train",
                          frozen_mask(params, cfg.frozen_layers))

    adamw = optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)
  parts.append(adamw)
  if trainable_rows is not None:
    parts.append(train_rows_only(trainable_rows, vocab_size))
  return optax.chain(*parts)
