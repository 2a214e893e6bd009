"""Parity with Hugging Face transformers' Qwen3ForCausalLM and LlamaForCausalLM, checkpoint round
trips and errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from gr2_jax.errors import UserError
from gr2_jax.models import hf_io
from gr2_jax.models import qwen3
from gr2_jax.parallel import mesh as mesh_lib
from gr2_jax.parallel import sharding

# The PyTorch reference is a test extra: missing, the parity tests fail instead of skipping.
import torch  # pylint: disable=g-import-not-at-top,wrong-import-order
import transformers  # pylint: disable=g-import-not-at-top,wrong-import-order

TOL = 1e-4


def _hf_model(tie, seed=0, arch="qwen3"):
  torch.manual_seed(seed)
  config_cls, model_cls = {
      "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
      "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[arch]
  config = config_cls(
      vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=16, intermediate_size=128, rms_norm_eps=1e-6,
      rope_parameters={"rope_type": "default", "rope_theta": 1e6},
      tie_word_embeddings=tie)
  model = model_cls(config).float().eval()
  with torch.no_grad():
    # Random norm scales too, so a mixed-up norm cannot hide behind all-ones weights.
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  return model


def _tokens():
  return np.random.RandomState(0).randint(0, 128, (2, 8)).astype(np.int64)


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(tokens)).logits.numpy()


def _our_logits(model, tokens, mesh=None):
  graphdef, state = nnx.split(model)
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  fn = jax.jit(qwen3.apply, static_argnums=0)
  if mesh is None:
    logits, _ = fn(graphdef, state, jnp.asarray(tokens, jnp.int32), positions)
  else:
    with sharding.use_rules(mesh):
      logits, _ = fn(graphdef, state, jnp.asarray(tokens, jnp.int32), positions)
  return np.asarray(logits)


@pytest.mark.parametrize("arch,tie", [("qwen3", True), ("qwen3", False), ("llama", False)])
def test_logits_match_transformers_and_export_round_trips(arch, tie, tmp_path):
  hf = _hf_model(tie, arch=arch)
  hf.save_pretrained(tmp_path / "hf")
  tokens = _tokens()
  want = _hf_logits(hf, tokens)

  # The untied model loads onto a (2, 2, 2) mesh: every tensor is read shard by shard.
  mesh = None if tie else mesh_lib.make_mesh((2, 2, 2), jax.devices()[:8])
  model, cfg = hf_io.load_hf_checkpoint(str(tmp_path / "hf"), mesh=mesh)
  assert cfg.tie_embeddings == tie and cfg.rope_theta == 1e6 and cfg.num_kv_heads == 2
  assert cfg.qk_norm == (arch == "qwen3")
  if mesh is not None:
    assert model.layers[0].self_attn.o_proj.kernel[...].sharding.spec == P("tensor", None,
                                                                          "fsdp")
  got = _our_logits(model, tokens, mesh)
  err = np.abs(got - want).max()
  print(f"load parity {arch} tie={tie}: max abs logit diff {err:.2e}")
  assert err <= TOL

  hf_io.export_hf_checkpoint(model, cfg, str(tmp_path / "out"))
  back = type(hf).from_pretrained(str(tmp_path / "out")).float().eval()
  err = np.abs(_hf_logits(back, tokens) - want).max()
  print(f"export parity {arch} tie={tie}: max abs logit diff {err:.2e}")
  assert err <= TOL
  for name, p in hf.state_dict().items():
    np.testing.assert_array_equal(back.state_dict()[name].numpy(), p.numpy(), err_msg=name)


def test_sharded_export_with_index_reloads_and_legacy_rope_theta(tmp_path):
  cfg = qwen3.get_model_config("tiny", num_layers=1, vocab_size=64, tie_embeddings=False)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.RandomState(1)
  state = jax.tree.map(lambda x: rng.randn(*x.shape).astype(np.float32), state)
  model = nnx.merge(graphdef, state)
  hf_io.export_hf_checkpoint(model, cfg, str(tmp_path), max_shard_bytes=40_000)
  with open(tmp_path / hf_io.INDEX_FILE) as f:
    files = sorted(set(json.load(f)["weight_map"].values()))
  assert len(files) > 1 and files[-1].endswith(f"-of-{len(files):05d}.safetensors")
  assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors")) == files
  # Older transformers write rope_theta at the top level only.
  with open(tmp_path / "config.json") as f:
    config = json.load(f)
  del config["rope_parameters"]
  config["rope_theta"] = 5e5
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config, f)
  loaded, loaded_cfg = hf_io.load_hf_checkpoint(str(tmp_path))
  assert loaded_cfg.rope_theta == 5e5
  for a, b in zip(jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_bf16_checkpoint_loads_as_requested_dtype(tmp_path):
  hf = _hf_model(True).to(torch.bfloat16)
  hf.save_pretrained(tmp_path)
  model, cfg = hf_io.load_hf_checkpoint(str(tmp_path), dtype="float32")
  emb = model.embed_tokens.embedding[...]
  assert emb.dtype == jnp.float32
  want = hf.model.embed_tokens.weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(emb), want)  # bf16 -> fp32 is exact
  model, cfg = hf_io.load_hf_checkpoint(str(tmp_path), dtype="bfloat16")
  assert model.embed_tokens.embedding[...].dtype == jnp.bfloat16 and cfg.dtype == "bfloat16"


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf_tiny")
  _hf_model(False).save_pretrained(path)
  return path


def _copy_checkpoint(src, dst, edit_tensors=None, edit_config=None):
  os.makedirs(dst)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  if edit_tensors:
    edit_tensors(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(src, "config.json")) as f:
    config = json.load(f)
  if edit_config:
    edit_config(config)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config, f)
  return str(dst)


def test_missing_tensor_is_a_user_error_naming_it(saved_tiny, tmp_path):
  path = _copy_checkpoint(saved_tiny, tmp_path / "c",
                          lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(UserError, match=r"lacks tensor model\.layers\.1\.mlp\.up_proj\.weight"):
    hf_io.load_hf_checkpoint(path)


def test_wrong_shape_is_a_user_error_naming_the_tensor(saved_tiny, tmp_path):
  def shrink(t):
    t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:16]
  path = _copy_checkpoint(saved_tiny, tmp_path / "c", shrink)
  with pytest.raises(UserError, match=r"k_proj\.weight has shape \[16, 64\].*\[32, 64\]"):
    hf_io.load_hf_checkpoint(path)


def test_unsupported_model_type_is_a_user_error(saved_tiny, tmp_path):
  path = _copy_checkpoint(saved_tiny, tmp_path / "c",
                          edit_config=lambda c: c.update(model_type="mistral"))
  with pytest.raises(UserError, match="model_type 'mistral' is not supported"):
    hf_io.load_hf_checkpoint(path)


def test_missing_shard_is_a_user_error_naming_the_file(saved_tiny, tmp_path):
  path = _copy_checkpoint(saved_tiny, tmp_path / "c")
  index = {"weight_map": {"model.embed_tokens.weight": "model.safetensors",
                          "model.norm.weight": "model-00002-of-00002.safetensors"}}
  with open(os.path.join(path, hf_io.INDEX_FILE), "w") as f:
    json.dump(index, f)
  with pytest.raises(UserError, match="model-00002-of-00002.safetensors"):
    hf_io.load_hf_checkpoint(path)
