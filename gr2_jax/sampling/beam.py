"""Beam search over a constraint (e.g. the trie of every valid semantic ID), jitted end to end.

Each prompt is prefilled once; its KV cache is then copied to `beam_width` rows. A step scores
every (beam, token) pair by the beam's summed log-probability plus the token's raw-model log
softmax, masks tokens the constraint forbids, keeps the best `beam_width` pairs per prompt, and
reorders the cache and the constraint state to follow the surviving beams. Every sequence of a
SID trie has the same length, so the search runs a fixed number of steps and needs no
end-of-beam bookkeeping. Beams that found no allowed continuation score -inf.
"""

import functools
from typing import Optional

from flax import nnx
import jax
import jax.numpy as jnp

from gr2_jax.errors import UserError
from gr2_jax.parallel import sharding as sharding_lib
from gr2_jax.sampling import sampler
from gr2_jax.sampling.constraints import Constraint


@functools.partial(jax.jit, static_argnames=("graphdef", "beam_width", "num_steps", "cache_len"))
def _beam_search(graphdef, state, tokens, lengths, constraint, *, beam_width, num_steps,
                 cache_len):
  model = nnx.merge(graphdef, state)
  logits, cache = sampler.prefill.__wrapped__(graphdef, state, tokens, lengths,
                                              cache_len=cache_len)
  b, w = tokens.shape[0], beam_width
  v = logits.shape[-1]
  cache = {"k": jnp.repeat(cache["k"], w, axis=1), "v": jnp.repeat(cache["v"], w, axis=1),
           "end": jnp.repeat(cache["end"], w, axis=0)}
  logits = jnp.repeat(logits, w, axis=0)  # [B*W, V]
  # Only the first copy of each prompt is live, so the first step picks W distinct tokens.
  scores = jnp.tile(jnp.where(jnp.arange(w) == 0, 0.0, -jnp.inf), b)
  cstate = constraint.init(b * w) if constraint is not None else None
  out = jnp.zeros((b * w, num_steps), jnp.int32)
  base = (jnp.arange(b) * w)[:, None]

  def body(i, carry):
    cache, logits, scores, out, cstate = carry
    logp = jax.nn.log_softmax(logits, axis=-1)
    if constraint is not None:
      logp = jnp.where(constraint.allowed(cstate), logp, -jnp.inf)
    cand = (scores[:, None] + logp).reshape(b, w * v)
    top_scores, top_idx = jax.lax.top_k(cand, w)  # [B, W]
    src = (base + top_idx // v).reshape(-1)
    token = (top_idx % v).reshape(-1).astype(jnp.int32)
    cache = {"k": cache["k"][:, src], "v": cache["v"][:, src], "end": cache["end"][src]}
    out = out[src].at[:, i].set(token)
    if constraint is not None:
      cstate = jax.tree.map(lambda x: x[src], cstate)
      cstate = constraint.update(cstate, token)
    logits, cache = model(token[:, None], cache["end"][:, None],
                          segment_ids=jnp.ones((b * w, 1), jnp.int32), cache=cache)
    return cache, logits[:, 0], top_scores.reshape(-1), out, cstate

  _, _, scores, out, _ = jax.lax.fori_loop(0, num_steps, body,
                                           (cache, logits, scores, out, cstate))
  return out.reshape(b, w, num_steps), scores.reshape(b, w)


def beam_search(model: nnx.Module, prompts, *, beam_width: int, num_steps: int,
                constraint: Optional[Constraint] = None, pad_id: int = 0,
                prompt_multiple: int = 1):
  """Best `beam_width` continuations of `num_steps` tokens per prompt, best first.

  Returns (tokens int32 [B, W, num_steps], scores f32 [B, W]): scores are summed raw-model
  log-probabilities; -inf marks a beam the constraint left without continuations.
  """
  if beam_width < 1 or num_steps < 1:
    raise UserError(f"beam_width={beam_width} and num_steps={num_steps} must be >= 1")
  tokens, lengths = sampler.pad_prompts(prompts, None, pad_id, prompt_multiple)
  vocab = model.cfg.vocab_size
  if beam_width > vocab:
    raise UserError(f"beam_width={beam_width} exceeds the vocabulary of {vocab}")
  if constraint is not None and getattr(constraint, "vocab_size", vocab) != vocab:
    raise UserError(f"the constraint was built for a vocabulary of {constraint.vocab_size} "
                    f"but the model has {vocab}")
  graphdef, state = nnx.split(model)
  return sharding_lib.to_host(_beam_search(  # readable on every process of a pod
      graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), constraint,
      beam_width=int(beam_width), num_steps=int(num_steps),
      cache_len=int(tokens.shape[1] + num_steps)))
