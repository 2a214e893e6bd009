"""Hugging Face Qwen3 and Llama checkpoints (config.json + *.safetensors) to and from `Qwen3`.

Loading builds the model abstractly (`nnx.eval_shape`), then creates every parameter with
`jax.make_array_from_callback` on its NamedSharding: each device's callback reads only that
device's slice of the tensor from the safetensors file (`safe_open(..., framework="numpy")`
slices; bf16 comes back as an ml_dtypes array), so no device, and no host step, ever holds a
full copy per device. HF stores linear weights [out, in]; here kernels are [in, out] with heads
as their own axis, so each tensor has a layout kind that says how to map indices and data.
`param_table` and `load_params` serve the GGUF reader (`gguf_io.py`) too.
"""

import json
import math
import os

import jax
import numpy as np
from absl import logging
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from gr2_jax.errors import UserError
from gr2_jax.models import qwen3
from gr2_jax.parallel import mesh as mesh_lib
from gr2_jax.parallel import sharding as sharding_lib

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Layout kinds: "same" (identical), "t" (2-D transpose), "qkv" (HF [H*D, E] <-> [E, H, D]),
# "o" (HF [E, H*D] <-> [H, D, E]).
_LAYER_PARAMS = (
    (("input_layernorm", "weight"), "input_layernorm.weight", "same"),
    (("post_attention_layernorm", "weight"), "post_attention_layernorm.weight", "same"),
    (("self_attn", "q_proj", "kernel"), "self_attn.q_proj.weight", "qkv"),
    (("self_attn", "k_proj", "kernel"), "self_attn.k_proj.weight", "qkv"),
    (("self_attn", "v_proj", "kernel"), "self_attn.v_proj.weight", "qkv"),
    (("self_attn", "o_proj", "kernel"), "self_attn.o_proj.weight", "o"),
    (("self_attn", "q_norm", "weight"), "self_attn.q_norm.weight", "same"),
    (("self_attn", "k_norm", "weight"), "self_attn.k_norm.weight", "same"),
    (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", "t"),
    (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", "t"),
    (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", "t"),
)


def param_table(cfg):
  """[(path in nnx.state(model), HF tensor name, layout kind)] for every parameter."""
  table = [(("embed_tokens", "embedding"), "model.embed_tokens.weight", "same"),
           (("norm", "weight"), "model.norm.weight", "same")]
  for i in range(cfg.num_layers):
    for path, name, kind in _LAYER_PARAMS:
      if path[1] in ("q_norm", "k_norm") and not cfg.qk_norm:
        continue
      table.append((("layers", i) + path, f"model.layers.{i}.{name}", kind))
  if not cfg.tie_embeddings:
    table.append((("lm_head", "kernel"), "lm_head.weight", "t"))
  return table


def hf_shape(kind, shape):
  """The HF-layout shape of a parameter of our `shape` and layout `kind`."""
  if kind == "same":
    return tuple(shape)
  if kind == "t":
    return (shape[1], shape[0])
  if kind == "qkv":  # [E, H, D] -> [H*D, E]
    return (shape[1] * shape[2], shape[0])
  return (shape[2], shape[0] * shape[1])  # "o": [H, D, E] -> [E, H*D]


def read_block(tensor, kind, shape, index):
  """Our-layout block `index` of an HF-layout tensor (a safetensors slice or numpy array)."""
  s = [slice(*sl.indices(n)[:2]) for sl, n in zip(index, shape)]
  if kind == "same":
    return tensor[tuple(s)]
  if kind == "t":
    return tensor[s[1], s[0]].T
  if kind == "qkv":  # ours [E, H, D]; read whole heads, then pick head_dim
    d = shape[2]
    block = tensor[s[1].start * d:s[1].stop * d, s[0]]  # [h*D, e]
    block = block.reshape(s[1].stop - s[1].start, d, -1)[:, s[2], :]
    return block.transpose(2, 0, 1)
  d = shape[1]  # "o": ours [H, D, E]
  block = tensor[s[2], s[0].start * d:s[0].stop * d]  # [e, h*D]
  block = block.reshape(block.shape[0], s[0].stop - s[0].start, d)[:, :, s[1]]
  return block.transpose(1, 2, 0)


def _to_hf(kind, array):
  if kind == "same":
    return array
  if kind == "t":
    return array.T
  if kind == "qkv":
    return array.reshape(array.shape[0], -1).T
  return array.reshape(-1, array.shape[-1]).T


def _config_error(path, message):
  return UserError(f"{os.path.join(path, CONFIG_FILE)}: {message}")


# model_type -> (per-head q/k RMSNorm, tie_word_embeddings when config.json omits it; for llama
# that is LlamaConfig's default).
_MODEL_TYPES = {"qwen3": (True, True), "llama": (False, False)}


def config_from_hf(path, **overrides):
  """ModelConfig from a Hugging Face Qwen3 or Llama config.json in folder `path`."""
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    raise UserError(f"no {CONFIG_FILE} in {path}; point the checkpoint path at a Hugging Face "
                    "model folder")
  try:
    with open(file) as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    raise _config_error(path, f"is not valid JSON ({e})") from e
  model_type = hf.get("model_type")
  if model_type not in _MODEL_TYPES:
    raise _config_error(path, f"model_type {model_type!r} is not supported; only 'qwen3' "
                        "(Qwen3ForCausalLM) and 'llama' (LlamaForCausalLM) checkpoints load here")
  for bias in ("attention_bias", "mlp_bias"):
    if hf.get(bias):
      raise _config_error(path, f"{bias}=true is not supported by this model")
  if hf.get("hidden_act", "silu") != "silu":
    raise _config_error(path, f"hidden_act {hf['hidden_act']!r} is not supported (silu only)")
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise _config_error(path, f"rope_type {rope_type!r} is not supported (default RoPE only)")
  theta = rope.get("rope_theta", hf.get("rope_theta"))
  if theta is None:
    raise _config_error(path, "lacks rope_theta (rope_parameters['rope_theta'] or rope_theta)")

  def field(name):
    if name not in hf:
      raise _config_error(path, f"lacks the field {name!r}")
    return hf[name]

  heads = field("num_attention_heads")
  kwargs = dict(
      vocab_size=field("vocab_size"),
      hidden_size=field("hidden_size"),
      num_layers=field("num_hidden_layers"),
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads", heads),
      head_dim=hf.get("head_dim") or field("hidden_size") // heads,
      mlp_dim=field("intermediate_size"),
      rope_theta=float(theta),
      rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", _MODEL_TYPES[model_type][1])),
      qk_norm=_MODEL_TYPES[model_type][0],
  )
  kwargs.update(overrides)
  return qwen3.ModelConfig(**kwargs)


def _tensor_files(path):
  """HF tensor name -> safetensors file path."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise UserError(f"{index} has no 'weight_map'; the checkpoint index is malformed")
    files = {}
    for name, file in weight_map.items():
      full = os.path.join(path, file)
      if not os.path.isfile(full):
        raise UserError(f"checkpoint shard {full} (listed in {INDEX_FILE} for tensor {name}) is "
                        "missing; download the complete checkpoint")
      files[name] = full
    return files
  shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not shards:
    raise UserError(f"no *.safetensors files in {path}")
  files = {}
  for shard in shards:
    with safe_open(os.path.join(path, shard), framework="numpy") as f:
      for name in f.keys():
        files[name] = os.path.join(path, shard)
  return files


def load_params(cfg, reader, *, mesh=None, rules=None):
  """A `Qwen3(cfg)` whose parameters `reader` supplies, each created shard by shard on `mesh`.

  Args:
    cfg: the model's config; its param_dtype is the dtype of the parameters.
    reader: reader(HF tensor name, layout kind, our shape) -> a function of an index (tuple of
      slices into our shape) giving that block in our layout as numpy; it checks the tensor.
    mesh, rules: where the parameters go (one device if mesh is None).
  """
  mesh = mesh if mesh is not None else mesh_lib.single_device_mesh()
  graphdef, abstract = mesh_lib.abstract_model(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0)))
  shardings = nnx.to_flat_state(sharding_lib.state_shardings(abstract, mesh, rules))
  shardings = {p: v.get_value() for p, v in shardings}
  values = {}
  for param_path, name, kind in param_table(cfg):
    var = abstract
    for key in param_path:
      var = var[key]
    shape = var.shape
    block = reader(name, kind, shape)

    def read(index, block=block):
      return np.ascontiguousarray(block(index), dtype=cfg.weight_dtype)

    values[param_path] = jax.make_array_from_callback(shape, shardings[param_path], read)
  flat = nnx.to_flat_state(abstract)
  state = nnx.from_flat_state([(p, v.replace(values[p])) for p, v in flat])
  return nnx.merge(graphdef, state)


def load_hf_checkpoint(path, *, mesh=None, rules=None, dtype="float32", compute_dtype=None):
  """Loads a Hugging Face Qwen3 or Llama checkpoint folder onto `mesh` (one device if None).

  Args:
    path: folder with config.json and model.safetensors or sharded *.safetensors (+ index).
    mesh, rules: where the parameters go (see gr2_jax.parallel.sharding).
    dtype: parameter dtype; compute_dtype: ModelConfig.dtype (defaults to `dtype`).
  Returns:
    (model, ModelConfig).
  """
  cfg = config_from_hf(path, param_dtype=dtype, dtype=compute_dtype or dtype)
  files = _tensor_files(path)
  table = param_table(cfg)
  missing = [name for _, name, _ in table if name not in files]
  if missing:
    raise UserError(f"checkpoint {path} lacks tensor {missing[0]}"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                    + f"; expected by its config.json ({'tied' if cfg.tie_embeddings else 'untied'}"
                    " embeddings)")
  used = {name for _, name, _ in table}
  unused = sorted(set(files) - used - {"lm_head.weight"})
  if unused:
    logging.warning("ignoring %d checkpoint tensors not in the model, e.g. %s", len(unused),
                    unused[0])

  handles = {}

  def reader(name, kind, shape):
    file = files[name]
    if file not in handles:
      handles[file] = safe_open(file, framework="numpy")
    tensor = handles[file].get_slice(name)
    want = hf_shape(kind, shape)
    got = tuple(tensor.get_shape())
    if got != want:
      raise UserError(f"checkpoint tensor {name} has shape {list(got)} but the config.json "
                      f"implies {list(want)}; the checkpoint and its config disagree")
    return lambda index: read_block(tensor, kind, shape, index)

  try:
    model = load_params(cfg, reader, mesh=mesh, rules=rules)
  finally:
    handles.clear()  # safe_open handles close when released
  return model, cfg


def hf_config_dict(cfg, dtype="float32"):
  """The config.json a Hugging Face Qwen3ForCausalLM (LlamaForCausalLM without qk_norm) reads."""
  return {
      "architectures": ["Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"],
      "model_type": "qwen3" if cfg.qk_norm else "llama",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": 40960,
      "rms_norm_eps": cfg.rms_eps,
      # Both spellings: transformers >= 5 reads rope_parameters, older versions rope_theta.
      "rope_theta": cfg.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "tie_word_embeddings": cfg.tie_embeddings,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "use_sliding_window": False,
      "dtype": dtype,
      "torch_dtype": dtype,
  }


def _gather(array):
  if getattr(array, "is_fully_addressable", True):
    return np.asarray(jax.device_get(array))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def export_hf_checkpoint(model, cfg, path, *, dtype=None, max_shard_bytes=4 << 30,
                         config_overrides=None):
  """Writes config.json and safetensors (sharded with an index past `max_shard_bytes`).

  Parameters are gathered to the host one at a time, so the host holds at most one file's worth.
  config_overrides: extra config.json fields (e.g. the tokenizer's eos_token_id).
  """
  dtype = np.dtype(dtype or cfg.weight_dtype)
  dtype_name = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[dtype.name]
  os.makedirs(path, exist_ok=True)
  state = nnx.state(model, nnx.Param)
  table = param_table(cfg)
  total = sum(math.prod(_get(state, p).shape) for p, _, _ in table) * dtype.itemsize
  num_files = max(1, math.ceil(total / max_shard_bytes))
  weight_map = {}
  pending, pending_bytes, written = {}, 0, []

  def flush():
    nonlocal pending, pending_bytes
    if not pending:
      return
    name = (SINGLE_FILE if num_files == 1 else
            f"model-{len(written) + 1:05d}-of-{num_files:05d}.safetensors")
    save_file(pending, os.path.join(path, name), metadata={"format": "pt"})
    for tensor_name in pending:
      weight_map[tensor_name] = name
    written.append(name)
    pending, pending_bytes = {}, 0

  for param_path, name, kind in table:
    array = _to_hf(kind, _gather(_get(state, param_path)).astype(dtype))
    if pending and pending_bytes + array.nbytes > max_shard_bytes:
      flush()
    pending[name] = np.ascontiguousarray(array)
    pending_bytes += array.nbytes
  flush()
  if len(written) > 1:
    # Fix the "-of-N" names if the greedy packing made a different number of files.
    final = {}
    for i, old in enumerate(written):
      new = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
      os.replace(os.path.join(path, old), os.path.join(path, new + ".tmp"))
      final[old] = new
    for new in final.values():
      os.replace(os.path.join(path, new + ".tmp"), os.path.join(path, new))
    weight_map = {k: final[v] for k, v in weight_map.items()}
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump({**hf_config_dict(cfg, dtype_name), **(config_overrides or {})}, f, indent=2)


def _get(state, path):
  node = state
  for key in path:
    node = node[key]
  return node[...] if isinstance(node, nnx.Variable) else node
