"""Training metrics: a progress line on stdout (absl), TensorBoard event files, a JSONL copy."""

import json
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np


def model_flops_per_token(cfg, seq_len, frozen_layers=0):
  """Training FLOPs per token of a Qwen3 config: forward + backward (2x the forward).

  Counts every matmul the step really runs: the projections, the LM head (an embedding lookup
  is free) and the full [T, T] attention scores and mixing (the causal mask does not skip
  work here). With `frozen_layers` (`OptimConfig.frozen_layers`) the backward pass covers only
  the layers above them, and a tied LM head (the frozen embedding) gets the gradient of its
  input but not of its weights.
  """
  e, h, kvh, d, m = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  per_layer = 2 * (e * h * d * 2 + e * kvh * d * 2 + 3 * e * m) + 2 * 2 * seq_len * h * d
  head = 2 * e * cfg.vocab_size
  forward = cfg.num_layers * per_layer + head
  if frozen_layers <= 0:
    return 3 * forward
  head_backward = head if cfg.tie_embeddings else 2 * head
  return forward + 2 * (cfg.num_layers - frozen_layers) * per_layer + head_backward


def measure_peak_flops(n=2048, repeats=5):
  """FLOP/s of an n x n x n float32 matmul on one device (the best of `repeats`): the
  achievable peak the MFU is measured against. A 1024 matmul underestimated it on 2 CPU cores
  (MFU above 100% for a frozen-layer step); the best of several runs keeps a busy moment out."""
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best


class MetricsLogger:
  """Writes scalars to `<logdir>/events.*` (TensorBoard) and `<logdir>/metrics.jsonl`."""

  def __init__(self, logdir, total_steps, prefix=""):
    os.makedirs(logdir, exist_ok=True)
    self.logdir = logdir
    self.total_steps = total_steps
    self.prefix = prefix
    self._jsonl = None
    self._writer = None
    if jax.process_index() == 0:  # the other processes of a multi-host run log nothing
      self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a")
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(logdir=logdir, flush_secs=10)

  def write(self, step, metrics, kind="train"):
    """Logs `metrics` (name -> float) at `step` under the tag prefix `kind/`."""
    metrics = {k: float(v) for k, v in metrics.items()}
    if self._writer is not None:
      for k, v in metrics.items():
        if np.isfinite(v):
          # TensorBoard tags take [A-Za-z0-9_./-]: "R@1" is written as "R_1".
          self._writer.add_scalar(f"{kind}/{k}".replace("@", "_"), v, step)
    if self._jsonl is not None:
      self._jsonl.write(json.dumps({"step": int(step), "kind": kind, **metrics}) + "\n")
      self._jsonl.flush()

  def progress(self, step, metrics, eta_seconds=None):
    m = metrics
    line = (f"{self.prefix}step {step}/{self.total_steps} loss {m.get('loss', float('nan')):.4f}"
            f" lr {m.get('lr', 0):.2e} gnorm {m.get('grad_norm', 0):.3f}")
    rates = [k for k in m if k.endswith("_per_sec")] or ["tokens_per_sec"]
    for k in rates:  # tokens_per_sec -> "tok/s", slates_per_sec -> "slates/s"
      unit = "tok" if k == "tokens_per_sec" else k[:-len("_per_sec")]
      line += f" {unit}/s {m.get(k, 0):,.0f}"
    if "mfu" in m or rates == ["tokens_per_sec"]:
      line += f" mfu {100 * m.get('mfu', 0):.2f}%"
    if eta_seconds is not None:
      line += f" eta {eta_seconds / 60:.1f}m"
    logging.info(line)

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
    if self._writer is not None:
      self._writer.close()
