"""Tests for meshes and the sharded Qwen3 model: placement by the rules and 1-vs-8-device logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from gr2_jax.errors import UserError
from gr2_jax.models import qwen3
from gr2_jax.parallel import mesh as mesh_lib
from gr2_jax.parallel import sharding


def test_make_mesh_shape_and_auto_axes():
  mesh = mesh_lib.make_mesh((2, -1, 2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh.axis_types == (AxisType.Auto,) * 3
  with pytest.raises(UserError, match="needs 12 devices"):
    mesh_lib.make_mesh((2, 3, 2))


def test_sharded_model_follows_rules_and_matches_single_device_logits():
  cfg = qwen3.get_model_config("tiny", num_layers=1, tie_embeddings=False)
  mesh = mesh_lib.make_mesh((2, 2, 2), jax.devices()[:8])
  model = mesh_lib.create_sharded_model(cfg, mesh, seed=0)

  attn = model.layers[0].self_attn
  mlp = model.layers[0].mlp
  expected = {
      "embed": (model.embed_tokens.embedding, P("tensor", "fsdp")),
      "lm_head": (model.lm_head.kernel, P("fsdp", "tensor")),
      "q_proj": (attn.q_proj.kernel, P("fsdp", "tensor", None)),
      "k_proj": (attn.k_proj.kernel, P("fsdp", "tensor", None)),
      "o_proj": (attn.o_proj.kernel, P("tensor", None, "fsdp")),
      "gate_proj": (mlp.gate_proj.kernel, P("fsdp", "tensor")),
      "down_proj": (mlp.down_proj.kernel, P("tensor", "fsdp")),
      "norm": (model.norm.weight, P(None)),
  }
  for name, (var, spec) in expected.items():
    assert var[...].sharding.spec == spec, name
  # Each device holds only its shard: the embedding [512, 64] is split 2 x 2.
  shard_shapes = {s.data.shape for s in model.embed_tokens.embedding[...].addressable_shards}
  assert shard_shapes == {(256, 32)}

  graphdef, state = nnx.split(model)
  host_state = jax.tree.map(np.asarray, state)  # the same values, unsharded
  rng = np.random.RandomState(0)
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (4, 8)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (4, 8))
  apply = jax.jit(qwen3.apply, static_argnums=0)
  with jax.default_device(jax.devices()[0]):
    single, _ = apply(graphdef, jax.tree.map(jnp.asarray, host_state), tokens, positions)
  with sharding.use_rules(mesh):
    sharded, _ = apply(graphdef, state, tokens, positions)
  assert len(single.sharding.device_set) == 1
  assert sharded.sharding.spec == P(("data", "fsdp"), None, "tensor")
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, rtol=1e-5)


def test_reshard_model_moves_params_to_rule_placement():
  cfg = qwen3.get_model_config("tiny")
  graphdef, state = nnx.split(nnx.eval_shape(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))))
  state = jax.tree.map(lambda x: np.full(x.shape, 0.5, x.dtype), state)
  mesh = mesh_lib.make_mesh((1, 2, 4), jax.devices()[:8])
  model = mesh_lib.reshard_model(nnx.merge(graphdef, state), mesh)
  emb = model.embed_tokens.embedding[...]
  assert emb.sharding.spec == P("tensor", "fsdp")
  assert {s.data.shape for s in emb.addressable_shards} == {(128, 32)}
  # 2 KV heads cannot split 4 ways: the kv_heads dimension stays replicated.
  assert model.layers[0].self_attn.k_proj.kernel[...].sharding.spec == P("fsdp", None, None)
  np.testing.assert_array_equal(np.asarray(emb), 0.5)
