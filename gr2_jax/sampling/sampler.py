"""Batched autoregressive sampling on device: one jitted prefill, then a `lax.while_loop` decode.

The model enters the jitted functions as an NNX (graphdef, state) pair, so both are pure. The
prefill builds the KV cache and runs the right-padded prompts through it; the decode loop
donates that cache and, per step, picks one token per row from the last logits (constraint mask,
then greedy or temperature / top-k / top-p sampling), then feeds the tokens back at each row's
current length. Rows stop at a stop token (which is kept in the output), after
`max_new_tokens`, or when their cache is full; the loop ends when every row has stopped.

Log-probabilities: `logprobs[b, i]` is log softmax(logits / temperature) over the full
vocabulary at the sampled token, before the constraint mask and top-k / top-p: the tempered
policy pi_T(token | prefix), the verl convention, which the RL update recomputes by dividing its
logits by the same temperature (`gr2_jax.rl.learner.token_logps`). With temperature 1 or
`greedy=True` they are the raw model's log-probs (greedy keeps temperature 1 whatever
`temperature` says).

What a constraint or top-k / top-p does to the PPO ratio: the behaviour policy actually sampled
from the masked, renormalised distribution mu(y) = pi_T(y) / Z, Z = pi_T(allowed set) (the
allowed set being the constraint's, cut further by top-k / top-p). The ratio the update uses,
pi_theta,T(y) / pi_old,T(y) over the unmasked tempered distributions, equals the ratio of the
masked renormalised ones only up to the change of the allowed mass: for a fixed allowed set,
mu_theta(y) / mu_old(y) = pi_theta,T(y) / pi_old,T(y) * Z_old / Z_theta. At the on-policy
point theta = old both are exactly 1; off policy they drift apart as the new policy moves mass
into or out of the allowed set.

Entropies: `entropies[b, i]` is the entropy (nats) of the distribution the token was actually
drawn from, after temperature, constraint mask (and `vocab_limit`) and top-k / top-p; 0 for
greedy decoding (a point mass) and on padding.

Jump-forward (`jump_forward=C`, with a constraint): after a row picks its token, the tokens the
constraint then leaves as the only choice (the rest of a semantic ID once its first code names
one candidate, the separator, the closing bracket and the stop token) are appended without a
pick, up to C tokens per step in all, and the row's chunk goes through the model in one call
(its padding masked), so a step costs one model call per choice point instead of one per
token. The output is the step-by-step one: forced tokens are the only ones it could pick, their
log-probs come from the chunk's logits at the positions before them and their entropies are 0
(a point mass). Greedy output is identical up to float rounding; sampled output follows the
same distribution but draws from a different random stream (the loop's steps no longer count
tokens). The forced tokens' log-probs need the LM head at every chunk position, which on a
small model costs more than the rest of the chunk; a caller that does not read them (greedy
serving) sets `forced_logprobs=False`: the head then runs at each row's last chunk position
only and those log-probs are NaN.
"""

import collections
import dataclasses
import functools
from typing import NamedTuple, Optional, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from gr2_jax.errors import UserError
from gr2_jax.models import qwen3
from gr2_jax.parallel import sharding as sharding_lib
from gr2_jax.sampling.constraints import Constraint


class SampleOutput(NamedTuple):
  """Generated tokens per row, right-padded with `pad_id` after `lengths[b]` tokens."""
  tokens: jax.Array  # int32 [B, N]
  logprobs: jax.Array  # f32 [B, N], tempered unmasked log-probs (module docstring); 0 on padding
  lengths: jax.Array  # int32 [B], the stop token included
  done: jax.Array  # bool [B], True when the row emitted a stop token
  entropies: jax.Array  # f32 [B, N], entropy of the distribution sampled from; 0 on padding


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Static decoding settings (changing one recompiles the decode loop)."""
  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1.0 = off
  greedy: bool = False
  stop_tokens: tuple = ()
  pad_id: int = 0
  vocab_limit: int = 0  # > 0: only ids below it are sampled (the tokenizer's ids)
  jump_forward: int = 0  # > 1: forced tokens appended in chunks of up to this many (docstring)
  forced_logprobs: bool = True  # False: jump-forward skips the forced tokens' log-probs (NaN)

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise UserError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
    if not self.greedy and self.temperature <= 0:
      raise UserError(f"temperature={self.temperature} must be > 0 (or set greedy=True)")
    if self.top_k < 0:
      raise UserError(f"top_k={self.top_k} must be >= 0 (0 turns it off)")
    if not 0 < self.top_p <= 1:
      raise UserError(f"top_p={self.top_p} must be in (0, 1]")
    if self.jump_forward < 0 or self.jump_forward == 1:
      raise UserError(f"jump_forward={self.jump_forward} must be 0 (off) or at least 2 (the "
                      "picked token and one forced one per chunk)")


def pad_prompts(prompts, lengths=None, pad_id=0, multiple=1):
  """(tokens int32 [B, P], lengths int32 [B]) from a list of id lists or a padded array.

  P is rounded up to `multiple` so that nearby prompt lengths share one compilation.
  """
  if lengths is None:
    if isinstance(prompts, (np.ndarray, jax.Array)):
      raise UserError("a padded prompt array needs `lengths` (the real length of each row)")
    rows = [list(map(int, p)) for p in prompts]
    if not rows:
      raise UserError("sample() got no prompts")
    lengths = np.array([len(r) for r in rows], np.int32)
    width = max(1, int(lengths.max()))
    tokens = np.full((len(rows), width), pad_id, np.int32)
    for i, r in enumerate(rows):
      tokens[i, :len(r)] = r
  else:
    tokens = np.asarray(prompts, np.int32)
    lengths = np.asarray(lengths, np.int32)
    if tokens.ndim != 2 or lengths.shape != (tokens.shape[0],):
      raise UserError(f"prompts must be [B, P] with lengths [B]; got {tokens.shape} and "
                      f"{lengths.shape}")
    if (lengths > tokens.shape[1]).any():
      raise UserError(f"a prompt length {int(lengths.max())} exceeds the prompt array width "
                      f"{tokens.shape[1]}")
  if (lengths < 1).any():
    raise UserError(f"prompt {int(np.argmin(lengths))} is empty; every prompt needs a token")
  width = -(-tokens.shape[1] // multiple) * multiple
  if width != tokens.shape[1]:
    tokens = np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])), constant_values=pad_id)
  return tokens, lengths


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "cache_dtype"))
def prefill(graphdef, state, tokens, lengths, *, cache_len, cache_dtype=jnp.float32):
  """Runs right-padded prompts through a fresh cache; returns (last logits f32 [B, V], cache).

  The LM head runs only at each row's last prompt token: [B, V] logits, not [B, P, V].
  """
  model = nnx.merge(graphdef, state)
  b, p = tokens.shape
  cache = qwen3.init_cache(model.cfg, b, cache_len, cache_dtype)
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
  hidden, cache = model.hidden(tokens, positions, segment_ids=segment_ids, cache=cache)
  last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [B, 1, E]
  return model.logits(last)[:, 0], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "cache_dtype"))
def prefill_suffixes(graphdef, state, prefix_k, prefix_v, prefix_lengths, row_prefix, tokens,
                     lengths, *, cache_len, cache_dtype=jnp.float32):
  """Prefill of prompts that continue prefilled prefixes: (last logits f32 [B, V], cache).

  prefix_k, prefix_v: [L, M, W, KVH, D], the KV of M shared prefixes (`prefill_prefix`), prefix
  m's first prefix_lengths[m] slots valid. Row b continues prefix row_prefix[b] with its
  right-padded suffix tokens[b, :lengths[b]]. Each row's cache starts as a copy of its prefix's
  KV with `end` at the prefix length, so the suffix is written from there on (over the prefix's
  padding) and attends to the prefix: the result is a full prefill's up to float rounding.
  """
  model = nnx.merge(graphdef, state)
  b, p = tokens.shape
  cache = qwen3.init_cache(model.cfg, b, cache_len, cache_dtype)
  w = prefix_k.shape[2]
  cache["k"] = cache["k"].at[:, :, :w].set(prefix_k[:, row_prefix].astype(cache_dtype))
  cache["v"] = cache["v"].at[:, :, :w].set(prefix_v[:, row_prefix].astype(cache_dtype))
  start = prefix_lengths[row_prefix]
  cache["end"] = start
  positions = start[:, None] + jnp.arange(p, dtype=jnp.int32)[None, :]
  segment_ids = (jnp.arange(p)[None, :] < lengths[:, None]).astype(jnp.int32)
  hidden, cache = model.hidden(tokens, positions, segment_ids=segment_ids, cache=cache)
  last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)
  return model.logits(last)[:, 0], cache


class PrefixCache:
  """Prefilled KV caches of prompt prefixes shared by many requests, keyed by their tokens.

  The system turn and the candidates of a slate (prompt part order "system_candidates_user")
  are the same for every user shown that slate: their KV is computed once (`get`), kept (least
  recently used dropped past `max_entries`) and copied into each request's cache by
  `sample(..., prefix_lengths=...)`, which then prefills only the rest of each prompt.
  """

  def __init__(self, model, *, max_entries=256, multiple=64, cache_dtype=jnp.float32):
    if max_entries < 1 or multiple < 1:
      raise UserError("PrefixCache needs max_entries >= 1 and multiple >= 1")
    self.graphdef, self.state = nnx.split(model)
    self.cfg = model.cfg
    self.max_entries = int(max_entries)
    self.multiple = int(multiple)  # prefix widths are padded to this (shared compilations)
    self.cache_dtype = jnp.dtype(cache_dtype)
    self._entries = collections.OrderedDict()
    self.hits = 0
    self.misses = 0

  def __len__(self):
    return len(self._entries)

  def get(self, tokens):
    """(k, v) [L, 1, W, KVH, D] of the prefix `tokens` (a sequence of ids), W >= len(tokens)."""
    key = tuple(int(t) for t in tokens)
    if not key:
      raise UserError("a shared prefix needs at least one token")
    if key in self._entries:
      self.hits += 1
      self._entries.move_to_end(key)
      return self._entries[key]
    self.misses += 1
    toks, lens = pad_prompts([key], pad_id=0, multiple=self.multiple)
    _, cache = prefill(self.graphdef, self.state, jnp.asarray(toks), jnp.asarray(lens),
                       cache_len=toks.shape[1], cache_dtype=self.cache_dtype)
    entry = (cache["k"], cache["v"])
    self._entries[key] = entry
    while len(self._entries) > self.max_entries:
      self._entries.popitem(last=False)
    return entry

  def gather(self, prompts, prefix_lengths, pad_id=0, multiple=1):
    """The prefill inputs of prompts whose first prefix_lengths[b] tokens are a cached prefix:
    (prefix_k, prefix_v, prefix lengths [M], row -> prefix [B], suffix tokens [B, S], suffix
    lengths [B]). M is padded up to a power of two (repeats of the last prefix) and the widths
    to `multiple`, so that batches share compilations."""
    rows = [list(map(int, p)) for p in prompts]
    if len(prefix_lengths) != len(rows):
      raise UserError(f"{len(prefix_lengths)} prefix lengths for {len(rows)} prompts")
    keys, row_prefix, suffixes = {}, [], []
    for r, n in zip(rows, prefix_lengths):
      n = int(n)
      if not 1 <= n < len(r):
        raise UserError(f"a shared prefix of {n} tokens must leave at least one token of its "
                        f"{len(r)}-token prompt to prefill")
      row_prefix.append(keys.setdefault(tuple(r[:n]), len(keys)))
      suffixes.append(r[n:])
    entries = [self.get(k) for k in keys]
    width = max(e[0].shape[2] for e in entries)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, width - x.shape[2]), (0, 0), (0, 0)))
    m = 1 << (len(entries) - 1).bit_length()
    entries += [entries[-1]] * (m - len(entries))
    lengths = [len(k) for k in keys] + [len(k) for k in list(keys)[-1:]] * (m - len(keys))
    prefix_k = jnp.concatenate([pad(e[0]) for e in entries], axis=1)
    prefix_v = jnp.concatenate([pad(e[1]) for e in entries], axis=1)
    tokens, suffix_lengths = pad_prompts(suffixes, pad_id=pad_id, multiple=multiple)
    return (prefix_k, prefix_v, np.asarray(lengths, np.int32), np.asarray(row_prefix, np.int32),
            tokens, suffix_lengths)


def _tempered(logits, params):
  """logits / temperature; greedy decoding and temperature 1 keep the raw logits."""
  if params.greedy or params.temperature == 1.0:
    return logits
  return logits / params.temperature


def _truncate(logits, params):
  """Top-k and top-p applied to (tempered) logits [B, V] (masked entries are -inf)."""
  if params.top_k and params.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, params.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if params.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: token i stays if the mass before it
    # is below top_p (the most likely token always stays).
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = before < params.top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def _entropy(logits):
  """float32 [B]: entropy of softmax(logits [B, V]); -inf entries have probability 0."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.where(logits > -jnp.inf, jnp.exp(logp) * logp, 0.0), axis=-1)


def _choose(tempered, allowed, key, params):
  """(token int32 [B], entropy f32 [B]) from tempered logits [B, V] restricted to `allowed`."""
  masked = jnp.where(allowed, tempered, -jnp.inf)
  if params.greedy:
    token = jnp.argmax(masked, axis=-1).astype(jnp.int32)
    return token, jnp.zeros(token.shape, jnp.float32)
  sampled = _truncate(masked, params)
  token = jax.random.categorical(key, sampled, axis=-1).astype(jnp.int32)
  return token, _entropy(sampled)


def _pick(constraint, cstate, logits, active, step, key, error, params):
  """One token per row from the last logits [B, V]: (token, log-prob, entropy, empty, error).

  `empty` marks active rows whose constraint allowed no token (they take the unconstrained
  distribution, no NaNs, and stop; `error` keeps the first such (step, row), raised after the
  loop). Inactive rows get `pad_id` and log-prob 0.
  """
  b, v = logits.shape
  if constraint is not None:
    allowed = constraint.allowed(cstate)
    empty = ~jnp.any(allowed, axis=-1) & active
    first = jnp.argmax(empty)
    error = jnp.where((error[0] < 0) & jnp.any(empty),
                      jnp.stack([step, first.astype(jnp.int32)]), error)
    allowed = allowed | empty[:, None]
  else:
    empty = jnp.zeros((b,), bool)
    allowed = jnp.ones((b, v), bool)
  if params.vocab_limit:
    # Embedding rows past the tokenizer (padding of the vocabulary) are never emitted.
    allowed = allowed & (jnp.arange(v) < params.vocab_limit)[None, :]
  tempered = _tempered(logits, params)
  token, entropy = _choose(tempered, allowed, jax.random.fold_in(key, step), params)
  token = jnp.where(active, token, params.pad_id)
  # Over the full vocabulary, before the mask and top-k / top-p (see the module docstring).
  logprob = jnp.take_along_axis(jax.nn.log_softmax(tempered, axis=-1), token[:, None], axis=1)
  return token, jnp.where(active, logprob[:, 0], 0.0), entropy, empty, error


def _where_rows(take, new, old):
  """Per row b: the pytree `new` where take[b], else `old` (leaves with a leading batch axis)."""
  return jax.tree.map(
      lambda a, o: jnp.where(take.reshape(take.shape + (1,) * (a.ndim - 1)), a, o), new, old)


def _forced_run(constraint, cstate, first, going, count, budget, stops, params, width):
  """The tokens the constraint leaves as the only choice after each row's picked token.

  Returns (chunk int32 [B, width]: the picked token then the forced ones, padding after;
  n int32 [B]: the chunk's tokens; the constraint state after them). A row stops adding at a
  stop token, at its budget, or where the constraint leaves more than one token (or none).
  """
  b = first.shape[0]
  chunk = jnp.full((b, width), params.pad_id, jnp.int32).at[:, 0].set(first)
  n = jnp.ones((b,), jnp.int32)

  def cond(c):
    i, _, _, _, going = c
    return (i < width) & jnp.any(going)

  def body(c):
    i, chunk, n, cstate, going = c
    allowed = constraint.allowed(cstate)
    if params.vocab_limit:
      allowed = allowed & (jnp.arange(allowed.shape[1]) < params.vocab_limit)[None, :]
    single = jnp.sum(allowed, axis=-1) == 1
    forced = jnp.argmax(allowed, axis=-1).astype(jnp.int32)
    take = going & single
    chunk = chunk.at[:, i].set(jnp.where(take, forced, chunk[:, i]))
    cstate = _where_rows(take, constraint.update(cstate, forced), cstate)
    n = n + take.astype(jnp.int32)
    going = (take & ~jnp.any(forced[:, None] == stops[None, :], axis=-1)
             & (count + n < budget))
    return i + 1, chunk, n, cstate, going

  _, chunk, n, cstate, _ = jax.lax.while_loop(
      cond, body, (jnp.int32(1), chunk, n, cstate, going))
  return chunk, n, cstate


def _jump_body(model, constraint, key, params, budget, stops, carry):
  """One decode step with jump-forward (module docstring): pick, append forced, one call."""
  (step, cache, logits, out_tokens, out_logprobs, out_entropies, done, stopped, count, cstate,
   error) = carry
  b = logits.shape[0]
  width = params.jump_forward
  n_out = out_tokens.shape[1]
  active = ~done
  token, logprob, entropy, empty, error = _pick(constraint, cstate, logits, active, step, key,
                                                error, params)
  cstate = constraint.update(cstate, token)
  picked_stop = jnp.any(token[:, None] == stops[None, :], axis=-1)
  going = active & ~empty & ~picked_stop & (count + 1 < budget)
  chunk, n, cstate = _forced_run(constraint, cstate, token, going, count, budget, stops,
                                 params, width)
  n = jnp.where(active, n, 0)
  valid = jnp.arange(width)[None, :] < n[:, None]  # [B, C]
  # The chunk in one call at each row's current length (padding masked: `end` advances by n).
  x, cache = model.hidden(chunk, cache["end"][:, None] + jnp.arange(width)[None, :],
                          segment_ids=valid.astype(jnp.int32), cache=cache)
  last_pos = jnp.maximum(n - 1, 0)[:, None, None]
  if params.forced_logprobs:
    chunk_logits = model.logits(x)  # [B, C, V]
    # Log-probs of the forced tokens: the chunk's logits one position before each.
    logp = jax.nn.log_softmax(_tempered(chunk_logits[:, :-1], params), axis=-1)
    forced_lp = jnp.take_along_axis(logp, chunk[:, 1:, None], axis=2)[..., 0]  # [B, C-1]
    logits = jnp.take_along_axis(chunk_logits, last_pos, axis=1)[:, 0]
  else:
    forced_lp = jnp.full((b, width - 1), jnp.nan, jnp.float32)
    logits = model.logits(jnp.take_along_axis(x, last_pos, axis=1))[:, 0]
  lps = jnp.concatenate([logprob[:, None], forced_lp], axis=1)
  ents = jnp.zeros((b, width), jnp.float32).at[:, 0].set(entropy)
  rows = jnp.arange(b)[:, None]
  cols = jnp.where(valid, count[:, None] + jnp.arange(width)[None, :], n_out)  # n_out: dropped
  out_tokens = out_tokens.at[rows, cols].set(chunk, mode="drop")
  out_logprobs = out_logprobs.at[rows, cols].set(jnp.where(valid, lps, 0.0), mode="drop")
  out_entropies = out_entropies.at[rows, cols].set(ents, mode="drop")
  last = jnp.take_along_axis(chunk, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
  count = count + n
  stopped = stopped | (active & jnp.any(last[:, None] == stops[None, :], axis=-1))
  done = done | stopped | (count >= budget) | empty
  return (step + 1, cache, logits, out_tokens, out_logprobs, out_entropies, done,
          stopped, count, cstate, error)


@functools.partial(jax.jit, static_argnames=("graphdef", "params"), donate_argnames=("cache",))
def decode(graphdef, state, logits, cache, lengths, key, constraint, *, params):
  """The decode loop from the prefill's last logits; returns (SampleOutput, cache, error).

  The returned cache holds the prompts and the generated tokens (it reuses the donated
  buffers; with `params.jump_forward` also KV of chunk padding past each row's end). `error`
  is (step, row) of the first row whose constraint allowed no token, or (-1, -1).
  """
  model = nnx.merge(graphdef, state)
  b = logits.shape[0]
  n = params.max_new_tokens
  cache_len = cache["k"].shape[2]
  # A row generates at most until its cache is full: token i is fed at slot length + i - 1.
  budget = jnp.minimum(n, cache_len - lengths + 1)
  stops = jnp.asarray(params.stop_tokens, jnp.int32).reshape(-1)
  cstate = constraint.init(b) if constraint is not None else None

  def cond(carry):
    step, done = carry[0], carry[6]
    return (step < n) & ~jnp.all(done)

  def body(carry):
    (step, cache, logits, out_tokens, out_logprobs, out_entropies, done, stopped, count, cstate,
     error) = carry
    active = ~done
    token, logprob, entropy, empty, error = _pick(constraint, cstate, logits, active, step, key,
                                                  error, params)
    out_tokens = out_tokens.at[:, step].set(token)
    out_logprobs = out_logprobs.at[:, step].set(logprob)
    out_entropies = out_entropies.at[:, step].set(jnp.where(active, entropy, 0.0))
    count = count + active.astype(jnp.int32)
    stopped = stopped | (active & jnp.any(token[:, None] == stops[None, :], axis=-1))
    done = done | stopped | (count >= budget) | empty
    if constraint is not None:
      cstate = constraint.update(cstate, token)
    # Feed the tokens at each row's current length; finished rows are padding (their cache
    # end stays put).
    logits, cache = model(token[:, None], cache["end"][:, None],
                          segment_ids=active.astype(jnp.int32)[:, None], cache=cache)
    return (step + 1, cache, logits[:, 0], out_tokens, out_logprobs, out_entropies, done,
            stopped, count, cstate, error)

  if params.jump_forward and constraint is not None:
    body = functools.partial(_jump_body, model, constraint, key, params, budget, stops)

  carry = (jnp.int32(0), cache, logits, jnp.full((b, n), params.pad_id, jnp.int32),
           jnp.zeros((b, n), jnp.float32), jnp.zeros((b, n), jnp.float32),
           jnp.zeros((b,), bool), jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), cstate,
           jnp.full((2,), -1, jnp.int32))
  _, cache, _, tokens, logprobs, entropies, _, stopped, count, _, error = jax.lax.while_loop(
      cond, body, carry)
  return SampleOutput(tokens, logprobs, count, stopped, entropies), cache, error


def sample(model: nnx.Module, prompts, *, lengths=None, key: jax.Array,
           max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, greedy: bool = False, stop_tokens: Sequence[int] = (),
           pad_id: int = 0, constraint: Optional[Constraint] = None,
           cache_len: Optional[int] = None, cache_dtype=jnp.float32,
           prompt_multiple: int = 1, vocab_limit: int = 0,
           prefix_cache: Optional[PrefixCache] = None,
           prefix_lengths: Optional[Sequence[int]] = None,
           jump_forward: int = 0, forced_logprobs: bool = True) -> SampleOutput:
  """Samples up to `max_new_tokens` per prompt from a Qwen3 model.

  Args:
    model: a `gr2_jax.models.qwen3.Qwen3`.
    prompts: a list of id lists, or a right-padded int32 [B, P] array with `lengths`.
    key: PRNG key; the same key, prompts and settings give the same output.
    temperature, top_k, top_p, greedy: how a token is picked; top_k=0 / top_p=1 are off.
      `logprobs` are tempered by `temperature` unless greedy (see the module docstring).
    stop_tokens: a row stops after emitting one of these (it is kept in the output).
    pad_id: fills `tokens` after each row's end and pads the prompts.
    constraint: restricts the allowed tokens per step (see `constraints.py`).
    cache_len: KV cache slots per row; default: padded prompt width + max_new_tokens. A row
      whose cache fills stops early.
    prompt_multiple: rounds the padded prompt width up, to share compilations.
    vocab_limit: when > 0, only token ids below it are emitted (pass the tokenizer's size when
      the model has padded vocabulary rows, so that every output decodes).
    prefix_cache, prefix_lengths: with both, the first prefix_lengths[b] tokens of prompt b (a
      list of id lists) are a shared prefix whose KV comes from `prefix_cache` (prefilled once
      per distinct prefix); only the rest of each prompt is prefilled. The output equals the
      full prefill's up to float rounding. cache_len then defaults to the larger of the padded
      prefix width and the padded longest prompt, + max_new_tokens.
    jump_forward: with a constraint, the tokens it leaves as the only choice are appended and
      fed in chunks of up to this many per step (module docstring); 0 = one token per step.
    forced_logprobs: False skips the log-probs of jump-forward's forced tokens (NaN there).
  """
  params = SamplingParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                          top_k=int(top_k), top_p=float(top_p), greedy=bool(greedy),
                          stop_tokens=tuple(int(t) for t in stop_tokens), pad_id=int(pad_id),
                          vocab_limit=int(vocab_limit), jump_forward=int(jump_forward),
                          forced_logprobs=bool(forced_logprobs))
  if params.jump_forward and constraint is None:
    raise UserError("jump_forward needs a constraint (it appends the tokens the constraint "
                    "forces)")
  if (prefix_cache is None) != (prefix_lengths is None):
    raise UserError("prefix reuse needs both prefix_cache and prefix_lengths")
  if prefix_cache is not None:
    if lengths is not None:
      raise UserError("prefix reuse takes the prompts as id lists, not a padded array")
    if prefix_cache.cfg != model.cfg:
      raise UserError("the prefix cache was built for a different model")
    pre = prefix_cache.gather(prompts, prefix_lengths, params.pad_id, prompt_multiple)
    prefix_k, prefix_v, pre_lengths, row_prefix, tokens, suffix_lengths = pre
    lengths = pre_lengths[row_prefix] + suffix_lengths  # the full prompts' lengths
    if cache_len is None:
      # Room for the prefix copy and for the longest full prompt (padded as a full prefill
      # would pad it), then the new tokens: no wider than a full prefill's cache.
      full = -(-int(lengths.max()) // prompt_multiple) * prompt_multiple
      cache_len = max(prefix_k.shape[2], full) + params.max_new_tokens
  else:
    tokens, lengths = pad_prompts(prompts, lengths, pad_id, prompt_multiple)
  if cache_len is None:
    cache_len = tokens.shape[1] + params.max_new_tokens
  if int(lengths.max()) > cache_len:
    raise UserError(f"prompt {int(np.argmax(lengths))} has {int(lengths.max())} tokens but the "
                    f"KV cache holds {cache_len}; raise cache_len or shorten the prompt")
  vocab = model.cfg.vocab_size
  for name, ids in (("stop token", params.stop_tokens), ("pad_id", (params.pad_id,))):
    for t in ids:
      if not 0 <= t < vocab:
        raise UserError(f"{name} {t} is outside the model's vocabulary of {vocab}")
  if constraint is not None:
    if getattr(constraint, "vocab_size", vocab) != vocab:
      raise UserError(f"the constraint was built for a vocabulary of {constraint.vocab_size} "
                      f"but the model has {vocab}")
    batch = tokens.shape[0]
    jax.eval_shape(lambda: constraint.init(batch))  # a batch mismatch fails here, uncompiled
  graphdef, state = nnx.split(model)
  if prefix_cache is not None:
    logits, cache = prefill_suffixes(
        graphdef, state, prefix_k, prefix_v, jnp.asarray(pre_lengths), jnp.asarray(row_prefix),
        jnp.asarray(tokens), jnp.asarray(suffix_lengths), cache_len=int(cache_len),
        cache_dtype=jnp.dtype(cache_dtype))
    lengths = jnp.asarray(lengths)
  else:
    lengths = jnp.asarray(lengths)
    logits, cache = prefill(graphdef, state, jnp.asarray(tokens), lengths,
                            cache_len=int(cache_len), cache_dtype=jnp.dtype(cache_dtype))
  out, _, error = decode(graphdef, state, logits, cache, lengths, key, constraint, params=params)
  out, error = sharding_lib.to_host((out, error))  # readable on every process of a pod
  step, row = (int(x) for x in jax.device_get(error))
  if step >= 0:
    raise UserError(f"constraint left no allowed token at step {step} for row {row}; check "
                    "that the constraint's sequences can be completed (stop tokens allowed?)")
  return out
