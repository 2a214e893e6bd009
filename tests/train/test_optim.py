"""Learning-rate schedule and the vocabulary-row mask."""

import math

import jax.numpy as jnp
import numpy as np
import optax

from gr2_jax.train import optim


def test_schedule_warmup_then_cosine():
  cfg = optim.OptimConfig(learning_rate=1.0, warmup_steps=10, total_steps=110, end_lr_ratio=0.1)
  s = optim.lr_schedule(cfg)
  assert float(s(0)) == 0.0
  np.testing.assert_allclose(float(s(5)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(s(10)), 1.0, rtol=1e-6)
  # Halfway through the decay: end + (peak - end) * (1 + cos(pi / 2)) / 2 = 0.55.
  np.testing.assert_allclose(float(s(60)), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)),
                             rtol=1e-5)
  np.testing.assert_allclose(float(s(110)), 0.1, rtol=1e-5)


def test_train_rows_only_leaves_other_rows_unchanged():
  params = {"embed_tokens": {"embedding": jnp.ones((6, 3))}, "norm": {"weight": jnp.ones(3)}}
  cfg = optim.OptimConfig(learning_rate=0.1, total_steps=10, weight_decay=0.5, clip_norm=1.0)
  tx = optim.make_optimizer(cfg, trainable_rows=[1, 4], vocab_size=6)
  grads = {"embed_tokens": {"embedding": jnp.ones((6, 3))}, "norm": {"weight": jnp.ones(3)}}
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  emb = np.asarray(params["embed_tokens"]["embedding"])
  np.testing.assert_array_equal(emb[[0, 2, 3, 5]], 1.0)
  assert (emb[[1, 4]] < 1.0).all()
  np.testing.assert_array_equal(params["norm"]["weight"], 1.0)


def test_model_flops_count_the_backward_of_trained_layers_only():
  from gr2_jax.models import qwen3
  from gr2_jax.train import metrics_log
  cfg = qwen3.get_model_config("tiny", vocab_size=100, num_layers=3, hidden_size=8,
                               mlp_dim=16, num_heads=2, num_kv_heads=1, head_dim=4,
                               tie_embeddings=True)
  # Per layer and token: q, o (8 x 8 each), k, v (8 x 4 each), gate/up/down (8 x 16 each):
  # 2 * (64 + 64 + 32 + 32 + 384) = 1152, plus attention 2 * 2 * T * heads * head_dim = 32 T.
  t = 10
  layer = 1152 + 32 * t
  head = 2 * 8 * 100
  forward = 3 * layer + head
  assert metrics_log.model_flops_per_token(cfg, t) == 3 * forward
  # Two layers frozen: the backward of one layer (2x) and the tied head's input gradient (1x).
  assert metrics_log.model_flops_per_token(cfg, t, 2) == forward + 2 * layer + head
  untied = qwen3.get_model_config("tiny", vocab_size=100, num_layers=3, hidden_size=8,
                                  mlp_dim=16, num_heads=2, num_kv_heads=1, head_dim=4,
                                  tie_embeddings=False)
  assert metrics_log.model_flops_per_token(untied, t, 2) == forward + 2 * layer + 2 * head
