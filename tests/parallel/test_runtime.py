"""The model runtime: config -> mesh, rules and numerics; models built, loaded, saved and
placed through it; bad runtime configs end in one clear error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from gr2_jax.errors import UserError
from gr2_jax.models import artifact
from gr2_jax.models import qwen3
from gr2_jax.parallel import runtime
from gr2_jax.parallel import sharding
from gr2_jax.text import tokenizers
from tests.text.test_tokenizers import _byte_level_hf

CFG = qwen3.get_model_config("tiny", num_layers=1, tie_embeddings=False)


def _rt(mesh=(-1, 1, 1), num_devices=0, **fields):
  section = runtime.section()
  section.mesh = mesh
  for k, v in fields.items():
    section[k] = v
  return runtime.for_devices(section, num_devices=num_devices)


def test_section_to_mesh_rules_and_numerics():
  rt = _rt((2, 2, -1), rules=("embed=fsdp+data", "vocab="), dtype="bfloat16", remat=True)
  assert dict(rt.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  # The config's rules come first, so they win over the default table.
  assert sharding.logical_to_spec(("vocab", "embed"), rt.rules) == P(None, ("fsdp", "data"))
  assert sharding.logical_to_spec(("batch", "act_mlp"), rt.rules) == P(("data", "fsdp"), "tensor")
  cfg = rt.model_config(CFG)
  assert (cfg.dtype, cfg.param_dtype, cfg.remat) == ("bfloat16", "float32", True)
  assert dict(_rt(num_devices=2).mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("fields, message", [
    (dict(mesh=(3, 1, 1)), "needs 3 devices but 8 are given"),
    (dict(mesh=(2, 2)), "needs one size per axis"),
    (dict(rules=("heads=model",)), "unknown mesh axis 'model'"),
    (dict(rules=("experts=tensor",)), "unknown logical axis 'experts'"),
    (dict(rules=("heads",)), "is not 'logical_axis=mesh_axis"),
    (dict(dtype="fp8"), "runtime.dtype='fp8' must be one of"),
    (dict(num_devices=16), "num_devices=16 but only 8 devices"),
])
def test_bad_runtime_configs_end_in_one_clear_error(fields, message):
  with pytest.raises(UserError, match=message):
    _rt(**fields)


def test_param_specs_follow_the_rules_without_allocating():
  rt = _rt((1, 2, 4))
  specs = rt.param_specs(qwen3.get_model_config("qwen3-8b"))
  assert specs["layers/0/mlp/up_proj/kernel"] == P("fsdp", "tensor")
  assert specs["layers/0/self_attn/o_proj/kernel"] == P("tensor", None, "fsdp")
  assert specs["norm/weight"] == P(None)


def test_activate_makes_shard_constrain_activations_by_the_rules():
  rt = _rt((2, 2, 2))
  x = jnp.ones((8, 4, 16))
  fn = jax.jit(lambda x: sharding.shard(x * 2, ("batch", "length", "act_mlp")))
  assert fn(x).sharding.num_devices == 1  # outside: a no-op, the input's one device
  with rt.activate():
    y = fn(x)
  assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")
  assert sharding.active_rules() is None  # left again


def test_save_then_load_on_another_mesh_and_dtype(tmp_path):
  src = _rt(num_devices=1)
  model = src.init_model(CFG, seed=3)
  tok = tokenizers.HFTokenizer(_byte_level_hf(["<|im_start|>", "<|im_end|>"]))
  src.save(str(tmp_path), model, tok)
  want = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))

  rt = _rt((2, 2, 2), param_dtype="bfloat16", dtype="bfloat16")
  loaded, tok2 = rt.load(str(tmp_path))
  assert tok2.vocab_size == tok.vocab_size
  assert loaded.cfg.param_dtype == "bfloat16" and loaded.cfg.dtype == "bfloat16"
  got = nnx.to_pure_dict(nnx.state(loaded))
  assert got["layers"][0]["mlp"]["down_proj"]["kernel"].sharding.spec == P("tensor", "fsdp")
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a), np.asarray(jnp.asarray(b, jnp.bfloat16)))
  # The artifact itself keeps its own numerics.
  assert artifact.read_model_config(str(tmp_path)).param_dtype == "float32"


def test_bfloat16_compute_and_remat_track_float32_logits():
  rt32 = _rt((8, 1, 1))
  model = rt32.init_model(CFG, seed=0)
  rng = np.random.RandomState(0)
  tokens = jnp.asarray(rng.randint(0, CFG.vocab_size, (8, 16)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (8, 16))

  def logits(m):
    graphdef, state = nnx.split(m)
    out, _ = jax.jit(qwen3.apply, static_argnums=0)(graphdef, state, tokens, positions)
    return np.asarray(out)

  with rt32.activate():
    ref = logits(model)
  rt16 = _rt((2, 2, 2), dtype="bfloat16", remat=True)
  with rt16.activate():
    placed = rt16.place(model)
    assert placed.cfg.dtype == "bfloat16" and placed.cfg.remat
    low = logits(placed)
  assert placed.embed_tokens.embedding[...].dtype == jnp.float32  # master weights stay f32
  # bfloat16 keeps ~3 significant digits: the logits agree to that, and the argmax mostly.
  np.testing.assert_allclose(low, ref, atol=0.05, rtol=0.05)
  assert (low.argmax(-1) == ref.argmax(-1)).mean() > 0.9
  assert np.abs(low - ref).max() > 0  # it did compute in bfloat16


def test_remat_gives_the_same_loss_and_gradients():
  """Recomputing each layer in the backward pass changes memory, never the numbers."""
  rng = np.random.RandomState(1)
  tokens = jnp.asarray(rng.randint(0, CFG.vocab_size, (2, 12)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
  out = {}
  for remat in (False, True):
    rt = _rt((1, 1, 1), num_devices=1, remat=remat)
    graphdef, params = nnx.split(rt.init_model(CFG, seed=5))

    def loss(p, graphdef=graphdef):
      logits, _ = qwen3.apply(graphdef, p, tokens, positions)
      logp = jax.nn.log_softmax(logits[:, :-1], -1)
      return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

    out[remat] = jax.jit(jax.value_and_grad(loss))(params)
  np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(out[True][1]), jax.tree.leaves(out[False][1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_dimensions_the_mesh_does_not_divide_are_named():
  rt = _rt((1, 2, 4))
  bad = rt.undivided(qwen3.get_model_config("smollm2-135m"))  # 9 query / 3 KV heads
  assert ("layers/0/self_attn/k_proj/kernel", 3, "kv_heads", "tensor") in bad
  assert all(axis in ("heads", "kv_heads") for _, _, axis, _ in bad)
  assert rt.undivided(qwen3.get_model_config("qwen3-8b")) == []
