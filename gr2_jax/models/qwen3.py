"""Qwen3 decoder LLM in Flax NNX (Llama too: the same model without the q/k RMSNorm).

Architecture (as Hugging Face `Qwen3ForCausalLM`): token embedding; N decoder layers, each
`x + attn(rms(x))` then `x + mlp(rms(x))`; attention with bias-free q/k/v/o projections, a
per-head RMSNorm on q and k before RoPE ("rotate_half" convention) and grouped-query attention;
SwiGLU MLP; final RMSNorm; LM head tied to the embedding or separate. With `qk_norm=False` the
q/k RMSNorm and its parameters are absent, which is `LlamaForCausalLM` (default RoPE, no biases).

Module and parameter names follow the Hugging Face checkpoint (`embed_tokens`, `layers[i]
.self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`, `norm`, `lm_head`), so the mapping in
`hf_io.py` reads one to one. Projection kernels are stored input-major ([in, out], with heads as
their own axis: q_proj [E, H, D], o_proj [H, D, E]); HF stores [out, in].

Every parameter carries logical axis names (`out_sharding` metadata) and the main activations
are constrained by logical names through `gr2_jax.parallel.sharding.shard`, so parallelism is
chosen by the rules table alone.

KV cache: a dict {"k": [L, B, S, KVH, D], "v": same, "end": int32 [B]} made by `init_cache`.
With a cache, row b's T new keys/values go to slots end[b] .. end[b]+T-1, query t of row b sees
slots < end[b]+t+1, and the returned cache has end[b] advanced by the row's non-padding tokens,
so right-padded prompts can be prefilled together and then decoded one token at a time.

LM head at chosen positions: `Qwen3.hidden` gives the final-normed hidden states and
`Qwen3.logits` applies the head, so the sampler's prefill takes logits at each row's last prompt
token only, and `chunked_token_logps` / `token_logps` give the training losses per-token
log-probs with at most [B, chunk, V] logits alive (the full [B, T, V] at a 150k vocabulary is
gigabytes).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from gr2_jax.errors import UserError
from gr2_jax.parallel import sharding as sharding_lib
from gr2_jax.parallel.sharding import shard

_F32 = jnp.float32
INIT_STD = 0.02  # HF Qwen3 initializer_range
# Logical axes of the KV cache arrays (see gr2_jax.parallel.sharding.DEFAULT_RULES).
CACHE_AXES = ("layers", "cache_batch", "cache_length", "act_kv_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a Qwen3 model (a Llama model with qk_norm=False)."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 1e6
  rms_eps: float = 1e-6
  tie_embeddings: bool = True
  qk_norm: bool = True  # per-head RMSNorm on q and k (Qwen3); False for Llama
  dtype: str = "float32"  # compute dtype ("bfloat16" for bf16 compute)
  param_dtype: str = "float32"  # master weights
  remat: bool = False  # recompute each layer's activations in the backward pass

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "mlp_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise UserError(f"model config {name}={value!r} must be a positive integer")
    if self.num_heads % self.num_kv_heads:
      raise UserError(f"model config num_heads={self.num_heads} must be a multiple of "
                      f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise UserError(f"model config head_dim={self.head_dim} must be even for RoPE")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise UserError(f"model config {name}={getattr(self, name)!r} must be one of "
                        "float32, bfloat16, float16")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)


def _qwen3(layers, hidden, heads, mlp, tied):
  return ModelConfig(vocab_size=151936, hidden_size=hidden, num_layers=layers, num_heads=heads,
                     num_kv_heads=8, head_dim=128, mlp_dim=mlp, tie_embeddings=tied)


# Real shapes from the Hugging Face config.json of each Qwen/Qwen3-* checkpoint.
PRESETS = {
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, mlp_dim=128),
    # CPU main-job model; vocab_size is set from the trained tokenizer at build time.
    "demo": ModelConfig(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4,
                        num_kv_heads=2, head_dim=64, mlp_dim=768),
    "qwen3-0.6b": _qwen3(28, 1024, 16, 3072, True),
    "qwen3-1.7b": _qwen3(28, 2048, 16, 6144, True),
    "qwen3-4b": _qwen3(36, 2560, 32, 9728, True),
    "qwen3-8b": _qwen3(36, 4096, 32, 12288, False),
    "qwen3-14b": _qwen3(40, 5120, 40, 17408, False),
    "qwen3-32b": _qwen3(64, 5120, 64, 25600, False),
    # HuggingFaceTB/SmolLM2-135M(-Instruct): a Llama, so no q/k norm.
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                                num_kv_heads=3, head_dim=64, mlp_dim=1536, rope_theta=1e5,
                                rms_eps=1e-5, qk_norm=False),
}


def get_model_config(preset, **overrides):
  """The named preset with `overrides` (ModelConfig field names) applied."""
  if preset not in PRESETS:
    raise UserError(f"unknown model preset {preset!r}; valid presets: {', '.join(PRESETS)}")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise UserError(f"unknown model config field(s) {', '.join(unknown)}; valid fields: "
                    f"{', '.join(sorted(fields))}")
  return dataclasses.replace(PRESETS[preset], **overrides)


class _Keys:
  """Deterministic stream of PRNG keys from one key.

  Folding in a counter keeps initialisation free of per-parameter nnx.Rngs state updates,
  which are slow to trace for models with hundreds of parameters.
  """

  def __init__(self, key):
    self.key = key
    self.count = 0

  def __call__(self):
    self.count += 1
    return jax.random.fold_in(self.key, self.count)


def _param(keys, shape, axes, dtype, std=INIT_STD):
  value = std * jax.random.normal(keys(), shape, _F32)
  return nnx.Param(value.astype(dtype), out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis, computed in fp32."""

  def __init__(self, dim, eps, dtype):
    self.weight = nnx.Param(jnp.ones((dim,), dtype), out_sharding=("norm",),
                            eager_sharding=False)
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(_F32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.weight[...].astype(_F32)).astype(x.dtype)


class Proj(nnx.Module):
  """Bias-free projection whose kernel is [*in_dims, *out_dims] (input-major)."""

  def __init__(self, in_dims, out_dims, axes, cfg, keys):
    self.kernel = _param(keys, tuple(in_dims) + tuple(out_dims), axes, cfg.weight_dtype)
    self.num_in = len(in_dims)
    self.dtype = cfg.compute_dtype

  def __call__(self, x):
    return jnp.tensordot(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                         axes=self.num_in)


class Embed(nnx.Module):
  """Token embedding table [V, E]; `attend` is the tied LM head."""

  def __init__(self, cfg, keys):
    self.embedding = _param(keys, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                            cfg.weight_dtype)
    self.dtype = cfg.compute_dtype

  def __call__(self, tokens):
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x):
    return jnp.einsum("bte,ve->btv", x, self.embedding[...].astype(self.dtype),
                      preferred_element_type=_F32)


def rope_tables(positions, head_dim, theta):
  """cos, sin [B, T, D] for integer positions [B, T] (HF rotate_half layout)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=_F32) / head_dim))
  freqs = positions.astype(_F32)[..., None] * inv_freq  # [B, T, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """Rotates x [B, T, H, D] by the tables [B, T, D]."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def attend(q, k, v, mask, return_logprobs=False):
  """Grouped-query attention. q [B,T,H,D], k/v [B,S,KVH,D], mask bool [B,T,S] -> [B,T,H,D].

  With `return_logprobs` also the attention's log-probabilities, f32 [B, KVH, H/KVH, T, S]
  (query head g of KV group j is head j * H/KVH + g), for losses on where heads look.
  """
  b, t, h, d = q.shape
  kvh = k.shape[2]
  q = q.reshape(b, t, kvh, h // kvh, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype),
                      preferred_element_type=_F32) * (d ** -0.5)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(_F32).min)
  if return_logprobs:
    logprobs = jax.nn.log_softmax(scores, axis=-1)
    probs = jnp.exp(logprobs).astype(q.dtype)
  else:
    logprobs = None
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(q.dtype)).reshape(b, t, h, d)
  return (out, logprobs) if return_logprobs else out


class Attention(nnx.Module):
  """Qwen3 self-attention: q/k/v/o projections, q/k RMSNorm (if cfg.qk_norm), RoPE, GQA."""

  def __init__(self, cfg, keys):
    e, h, kvh, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q_proj = Proj([e], [h, d], ("embed", "heads", "head_dim"), cfg, keys)
    self.k_proj = Proj([e], [kvh, d], ("embed", "kv_heads", "head_dim"), cfg, keys)
    self.v_proj = Proj([e], [kvh, d], ("embed", "kv_heads", "head_dim"), cfg, keys)
    self.o_proj = Proj([h, d], [e], ("heads", "head_dim", "embed"), cfg, keys)
    self.qk_norm = cfg.qk_norm
    if cfg.qk_norm:
      self.q_norm = RMSNorm(d, cfg.rms_eps, cfg.weight_dtype)
      self.k_norm = RMSNorm(d, cfg.rms_eps, cfg.weight_dtype)

  def __call__(self, x, cos, sin, mask, kv=None, slots=None, attention_out=None):
    """x [B,T,E]; kv: the cache (k, v) [L,B,S,KVH,D] and this layer's index; slots [B,T].

    attention_out: a list that receives this layer's attention log-probabilities (`attend`).
    """
    q = self.q_proj(x)  # [B, T, H, D]
    k = self.k_proj(x)  # [B, T, KVH, D]
    if self.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    v = self.v_proj(x)
    q = shard(q, ("batch", "length", "act_heads", "head_dim"))
    k = shard(k, ("batch", "length", "act_kv_heads", "head_dim"))
    v = shard(v, ("batch", "length", "act_kv_heads", "head_dim"))
    if kv is not None:
      k_all, v_all, layer = kv
      rows = jnp.arange(x.shape[0])[:, None]
      # The scatter writes straight into the all-layer cache (in place inside the decode
      # loop); slots past the cache's end are dropped, callers size the cache.
      k_all = k_all.at[layer, rows, slots].set(k.astype(k_all.dtype))
      v_all = v_all.at[layer, rows, slots].set(v.astype(v_all.dtype))
      kv = (k_all, v_all, layer)
      k, v = k_all[layer], v_all[layer]
    if attention_out is None:
      out = attend(q, k, v, mask)
    else:
      out, logprobs = attend(q, k, v, mask, return_logprobs=True)
      attention_out.append(logprobs)
    out = shard(out, ("batch", "length", "act_heads", "head_dim"))
    return self.o_proj(out), kv


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg, keys):
    e, m = cfg.hidden_size, cfg.mlp_dim
    self.gate_proj = Proj([e], [m], ("embed", "mlp"), cfg, keys)
    self.up_proj = Proj([e], [m], ("embed", "mlp"), cfg, keys)
    self.down_proj = Proj([m], [e], ("mlp", "embed"), cfg, keys)

  def __call__(self, x):
    h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    h = shard(h, ("batch", "length", "act_mlp"))
    return self.down_proj(h)


class DecoderLayer(nnx.Module):
  """Pre-norm residual block: attention then MLP."""

  def __init__(self, cfg, keys):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps, cfg.weight_dtype)
    self.self_attn = Attention(cfg, keys)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps, cfg.weight_dtype)
    self.mlp = MLP(cfg, keys)

  def __call__(self, x, cos, sin, mask, kv=None, slots=None, attention_out=None):
    h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, slots, attention_out)
    x = shard(x + h, ("batch", "length", "act_embed"))
    x = x + self.mlp(self.post_attention_layernorm(x))
    return shard(x, ("batch", "length", "act_embed")), kv


def _run_layer(layer, x, cos, sin, mask, kv, slots):
  return layer(x, cos, sin, mask, kv, slots)


def _run_layer_remat(layer, x, cos, sin, mask, kv, slots):
  """`_run_layer` whose activations are recomputed in the backward pass: a pure function of
  the layer's state under `jax.checkpoint` (the layer is only read, never updated)."""
  graphdef, state = nnx.split(layer)

  @jax.checkpoint
  def run(state, x, cos, sin, mask, kv, slots):
    return nnx.merge(graphdef, state)(x, cos, sin, mask, kv, slots)

  return run(state, x, cos, sin, mask, kv, slots)


class Qwen3(nnx.Module):
  """Qwen3 causal LM."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    keys = _Keys(rngs.params())
    self.embed_tokens = Embed(cfg, keys)
    self.layers = nnx.List([DecoderLayer(cfg, keys) for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, cfg.weight_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = Proj([cfg.hidden_size], [cfg.vocab_size], ("embed", "vocab"), cfg, keys)

  def __call__(self, tokens, positions, *, segment_ids=None, cache=None):
    """Logits f32 [B, T, V] and the updated cache (None without one): `logits(hidden(...))`.

    Args:
      tokens, positions: int32 [B, T]; positions drive RoPE.
      segment_ids: int32 [B, T], 0 = padding. Without a cache a token attends only to earlier
        tokens of its own segment (packed sequences stay apart). With a cache it only decides
        how far each row's `end` advances; padding must be on the right of each row.
      cache: from `init_cache`; see the module docstring for its semantics.
    """
    x, cache = self.hidden(tokens, positions, segment_ids=segment_ids, cache=cache)
    return self.logits(x), cache

  def hidden(self, tokens, positions, *, segment_ids=None, cache=None):
    """The final-normed hidden states [B, T, E] (compute dtype) and the updated cache.

    Same arguments as `__call__`. Callers that need logits at a few positions only (the last
    prompt token, the answer tokens) gather those rows and apply `logits` to them, so the
    [B, T, V] logits are never built.
    """
    return self._forward(tokens, positions, segment_ids, cache, None)

  def hidden_and_attention(self, tokens, positions, layer, *, segment_ids=None):
    """(`hidden` without a cache, layer `layer`'s attention log-probabilities f32
    [B, KVH, H/KVH, T, T]): what a loss on where that layer's heads look needs, from the same
    forward pass (the layer runs without rematerialisation)."""
    if not 0 <= layer < self.cfg.num_layers:
      raise UserError(f"attention of layer {layer} asked of a {self.cfg.num_layers}-layer model")
    out = []
    x, _ = self._forward(tokens, positions, segment_ids, None, (layer, out))
    return x, out[0]

  def _forward(self, tokens, positions, segment_ids, cache, attention_of):
    cfg = self.cfg
    b, t = tokens.shape
    tokens = shard(tokens, ("batch", "length"))
    x = shard(self.embed_tokens(tokens), ("batch", "length", "act_embed"))
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    idx = jnp.arange(t)
    if cache is None:
      mask = jnp.broadcast_to(idx[None, :, None] >= idx[None, None, :], (b, t, t))
      if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
      slots = None
    else:
      end = cache["end"]
      slots = end[:, None] + idx[None, :]  # [B, T]
      mask = jnp.arange(cache["k"].shape[2])[None, None, :] < (slots + 1)[:, :, None]
      k_all, v_all = cache["k"], cache["v"]
    run = _run_layer_remat if cfg.remat else _run_layer
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (k_all, v_all, i)
      if attention_of is not None and i == attention_of[0]:
        x, kv = layer(x, cos, sin, mask, kv, slots, attention_out=attention_of[1])
      else:
        x, kv = run(layer, x, cos, sin, mask, kv, slots)
      if cache is not None:
        k_all, v_all = kv[0], kv[1]
    x = self.norm(x)
    if cache is None:
      return x, None
    if segment_ids is None:
      advance = jnp.full((b,), t, jnp.int32)
    else:
      advance = jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
    new_cache = {"k": shard(k_all, CACHE_AXES), "v": shard(v_all, CACHE_AXES),
                 "end": cache["end"] + advance}
    return x, new_cache

  def logits(self, x):
    """The LM head: f32 logits [B, T, V] of hidden states x [B, T, E] from `hidden`."""
    if self.cfg.tie_embeddings:
      logits = self.embed_tokens.attend(x)
    else:
      logits = jnp.tensordot(x, self.lm_head.kernel[...].astype(x.dtype), axes=1,
                             preferred_element_type=_F32)
    return shard(logits.astype(_F32), ("batch", "length", "act_vocab"))


def apply(graphdef, state, tokens, positions, *, segment_ids=None, cache=None):
  """Pure form of `Qwen3.__call__` on split (graphdef, state), for jax.jit."""
  return nnx.merge(graphdef, state)(tokens, positions, segment_ids=segment_ids, cache=cache)


def chunked_token_logps(hidden, head, targets, chunk, temperature=1.0):
  """f32 [B, T]: log softmax(head(hidden) / temperature) at `targets`, `chunk` positions at a time.

  The log-softmax runs over the sequence in chunks (`lax.map`), each under `jax.checkpoint`, so
  the forward and the backward pass hold the logits of one chunk, [B, chunk, V], never
  [B, T, V]; the backward pass recomputes each chunk's logits from its hidden rows. The values
  and gradients are those of the unchunked computation up to float rounding.

  Args:
    hidden: [B, T, E] from `Qwen3.hidden`.
    head: hidden rows [B, c, E] -> f32 logits [B, c, V], e.g. the model's `logits` method.
    targets: int32 [B, T], the token whose log-prob is taken at each position.
    chunk: positions per chunk; T is padded up to a multiple of it (0 or >= T: one chunk).
    temperature: the logits are divided by it (1.0 leaves them as they are).
  """
  b, t, e = hidden.shape
  chunk = t if chunk <= 0 else min(int(chunk), t)
  n = -(-t // chunk)
  pad = n * chunk - t
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  xs = hidden.reshape(b, n, chunk, e).swapaxes(0, 1)  # [n, B, c, E]
  ts = targets.reshape(b, n, chunk).swapaxes(0, 1)  # [n, B, c]
  tempered = not (isinstance(temperature, (int, float)) and temperature == 1.0)

  @jax.checkpoint
  def one(args):
    x, tgt = args
    logits = head(x).astype(_F32)  # [B, c, V]
    if tempered:
      logits = logits / temperature
    target = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
    return target - jax.nn.logsumexp(logits, axis=-1)

  out = jax.lax.map(one, (xs, ts))  # [n, B, c]
  return out.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]


def chunked_distill_stats(hidden, head, teacher_hidden, teacher_head, targets, chunk,
                          temperature=1.0, full=True):
  """Student and teacher per-token statistics, `chunk` positions at a time.

  Returns f32 [B, T] arrays (logp, teacher_logp, kl): the student's and the teacher's
  log softmax(logits / temperature) at `targets`, and, with `full`, the exact reverse
  KL(student || teacher) over the whole vocabulary at each position (else zeros). As in
  `chunked_token_logps`, each chunk runs under `jax.checkpoint`: the passes hold one chunk's
  [B, chunk, V] logits of each model, never [B, T, V].
  """
  b, t, e = hidden.shape
  et = teacher_hidden.shape[-1]
  chunk = t if chunk <= 0 else min(int(chunk), t)
  n = -(-t // chunk)
  pad = n * chunk - t
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    teacher_hidden = jnp.pad(teacher_hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  xs = hidden.reshape(b, n, chunk, e).swapaxes(0, 1)
  xt = teacher_hidden.reshape(b, n, chunk, et).swapaxes(0, 1)
  ts = targets.reshape(b, n, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one(args):
    x, y, tgt = args
    lp = jax.nn.log_softmax(head(x).astype(_F32) / temperature, axis=-1)
    lq = jax.nn.log_softmax(teacher_head(y).astype(_F32) / temperature, axis=-1)
    take = lambda l: jnp.take_along_axis(l, tgt[..., None], axis=-1)[..., 0]
    kl = jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1) if full else jnp.zeros(tgt.shape, _F32)
    return take(lp), take(lq), kl

  outs = jax.lax.map(one, (xs, xt, ts))
  return tuple(o.swapaxes(0, 1).reshape(b, n * chunk)[:, :t] for o in outs)


def token_logps(graphdef, state, tokens, positions, targets, *, segment_ids=None, chunk=128,
                temperature=1.0):
  """f32 [B, T]: log p(targets[t] | tokens[:t + 1]) at `temperature`, without [B, T, V] logits.

  Pure (for jax.jit and jax.grad); see `chunked_token_logps` for `chunk`.
  """
  model = nnx.merge(graphdef, state)
  x, _ = model.hidden(tokens, positions, segment_ids=segment_ids)
  return chunked_token_logps(x, model.logits, targets, chunk, temperature)


def init_cache(cfg, batch, max_len, dtype=jnp.float32):
  """An empty KV cache for `batch` rows of up to `max_len` tokens."""
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "end": jnp.zeros((batch,), jnp.int32)}


def cache_shardings(cfg, mesh, rules=None, batch=1, max_len=1):
  """NamedShardings for `init_cache(cfg, batch, max_len)` on `mesh` (for jit out_shardings)."""
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  kv = jax.sharding.NamedSharding(
      mesh, sharding_lib.logical_to_spec(CACHE_AXES, rules, mesh, shape))
  end = jax.sharding.NamedSharding(
      mesh, sharding_lib.logical_to_spec(("cache_batch",), rules, mesh, (batch,)))
  return {"k": kv, "v": kv, "end": end}


def param_counts(model_or_state):
  """(total, non_embedding) parameter counts; embedding and untied LM head count as embedding."""
  state = model_or_state
  if isinstance(model_or_state, nnx.Module):
    state = nnx.state(model_or_state, nnx.Param)
  total = embedding = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    size = math.prod(leaf.shape)
    total += size
    names = [str(getattr(p, "key", getattr(p, "name", ""))) for p in path]
    if "embed_tokens" in names or "lm_head" in names:
      embedding += size
  return total, total - embedding
