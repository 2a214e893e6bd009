"""Tests of the sampler against a full-recompute reference on the tiny Qwen3 model."""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gr2_jax.errors import UserError
from gr2_jax.models import qwen3
from gr2_jax.sampling import constraints
from gr2_jax.sampling import sampler

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
N = 6
WIDTH = 16  # reference forward width: any prompt plus every generated token


def random_tiny(vocab_size=64):
  """(graphdef, params) of the tiny model with host-drawn 0.4-scale weights.

  Drawn on the host: no per-shape compilations of the random ops. The 0.02-scale init would
  make the tied LM head echo the last token; larger weights give varied, prompt-dependent
  continuations.
  """
  cfg = qwen3.get_model_config("tiny", vocab_size=vocab_size)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.4 if x.ndim > 1 else np.ones(x.shape),
                            x.dtype), params)
  return graphdef, params


@pytest.fixture(scope="module")
def model():
  return nnx.merge(*random_tiny())


@pytest.fixture(scope="module")
def full_logprobs(model):
  """Log-softmax of a cache-free forward of one sequence, [len, V]."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(tokens):
    m = nnx.merge(graphdef, state)
    logits, _ = m(tokens[None], jnp.arange(WIDTH)[None])
    return jax.nn.log_softmax(logits[0], axis=-1)

  def run(seq):
    # Causal attention: right padding does not change the logits of the real tokens.
    padded = np.zeros(WIDTH, np.int32)
    padded[:len(seq)] = seq
    return np.asarray(forward(jnp.asarray(padded)))[:len(seq)]

  return run


def _greedy_reference(full_logprobs, prompt, steps, stops=()):
  seq = list(prompt)
  for _ in range(steps):
    seq.append(int(np.argmax(full_logprobs(seq)[-1])))
    if seq[-1] in stops:
      break
  return seq[len(prompt):]


def _rows(out):
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  return [tokens[b, :lengths[b]].tolist() for b in range(len(lengths))]


def _assert_padded(out, pad_id):
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  for b, n in enumerate(lengths):
    assert (tokens[b, n:] == pad_id).all()
    assert (np.asarray(out.logprobs)[b, n:] == 0).all()
    assert (np.asarray(out.entropies)[b, n:] == 0).all()


def test_greedy_with_cache_equals_full_recompute_and_stops(model, full_logprobs):
  plain = [_greedy_reference(full_logprobs, p, N) for p in PROMPTS]
  assert len({tuple(r) for r in plain}) == 3  # the model is not degenerate
  stop = plain[0][2]
  want = [_greedy_reference(full_logprobs, p, N, stops=(stop,)) for p in PROMPTS]
  out = sampler.sample(model, PROMPTS, key=jax.random.key(0), max_new_tokens=N, greedy=True,
                       stop_tokens=[stop], pad_id=63)
  assert _rows(out) == want
  np.testing.assert_array_equal(out.done, [stop in w for w in want])
  assert out.done[0] and out.lengths[0] <= 3
  _assert_padded(out, 63)
  # Greedy decoding samples from a point mass.
  assert (np.asarray(out.entropies) == 0).all()
  # The stop token only ends row 0: rows without it run the full recompute's N tokens.
  for b in range(3):
    if stop not in want[b]:
      assert _rows(out)[b] == plain[b]
  # Top-k = 1 sampling is greedy decoding, whatever the temperature.
  topk = sampler.sample(model, PROMPTS, key=jax.random.key(5), max_new_tokens=N,
                        temperature=0.7, top_k=1, stop_tokens=[stop], pad_id=63)
  assert _rows(topk) == want



def test_prefill_takes_the_head_at_the_last_prompt_token_only(model):
  """The last logits and cache equal those of the full [B, P, V] logits gathered at each row's
  last prompt token (the previous prefill), and so do the greedy tokens after them."""
  tokens, lengths = sampler.pad_prompts(PROMPTS, multiple=4)
  graphdef, state = nnx.split(model)
  last, cache = sampler.prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths),
                                cache_len=12)
  assert last.shape == (3, model.cfg.vocab_size)

  @jax.jit
  def full(state, tokens, lengths):
    b, p = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
    logits, cache = nnx.merge(graphdef, state)(
        tokens, positions, segment_ids=segment_ids,
        cache=qwen3.init_cache(model.cfg, b, 12))
    return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0], cache

  want, want_cache = full(state, jnp.asarray(tokens), jnp.asarray(lengths))
  np.testing.assert_allclose(last, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.argmax(last, -1), np.argmax(want, -1))
  for k in ("k", "v", "end"):
    np.testing.assert_array_equal(cache[k], want_cache[k])
  params = sampler.SamplingParams(max_new_tokens=N, greedy=True)
  lengths = jnp.asarray(lengths)
  out, _, _ = sampler.decode(graphdef, state, last, cache, lengths, jax.random.key(0), None,
                             params=params)
  ref, _, _ = sampler.decode(graphdef, state, want, want_cache, lengths, jax.random.key(0), None,
                             params=params)
  np.testing.assert_array_equal(out.tokens, ref.tokens)


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _entropy(logits, temperature, allowed=None, top_k=0):
  """Entropy of softmax(logits / T) restricted to `allowed` and the top k, in float64."""
  z = np.asarray(logits, np.float64) / temperature
  if allowed is not None:
    z = np.where(allowed, z, -np.inf)
  if top_k:
    z = np.where(z < np.sort(z)[-top_k], -np.inf, z)
  keep = z > -np.inf
  logp = _log_softmax(z[keep])
  return float(-np.sum(np.exp(logp) * logp))


def test_sampling_is_reproducible_and_logprobs_are_the_tempered_models(model, full_logprobs):
  kw = dict(max_new_tokens=N, temperature=1.5, top_p=0.95, pad_id=0)
  a = sampler.sample(model, PROMPTS, key=jax.random.key(3), **kw)
  b = sampler.sample(model, PROMPTS, key=jax.random.key(3), **kw)
  c = sampler.sample(model, PROMPTS, key=jax.random.key(4), **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
  assert not np.array_equal(a.tokens, c.tokens)
  np.testing.assert_array_equal(a.lengths, [N, N, N])
  for prompt, row, logprobs in zip(PROMPTS, _rows(a), np.asarray(a.logprobs)):
    # log softmax(logits / T) over the whole vocabulary, whatever top-p kept.
    ref = _log_softmax(full_logprobs(prompt + row) / 1.5)
    want = [ref[len(prompt) - 1 + i, t] for i, t in enumerate(row)]
    np.testing.assert_allclose(logprobs, want, atol=2e-4)


def test_entropies_are_those_of_the_truncated_tempered_distribution(model, full_logprobs):
  out = sampler.sample(model, PROMPTS, key=jax.random.key(1), max_new_tokens=N,
                       temperature=0.7, top_k=5)
  for prompt, row, ent in zip(PROMPTS, _rows(out), np.asarray(out.entropies)):
    ref = full_logprobs(prompt + row)
    want = [_entropy(ref[len(prompt) - 1 + i], 0.7, top_k=5) for i in range(len(row))]
    np.testing.assert_allclose(ent, want, atol=2e-4)
    assert (np.asarray(want) < np.log(5) + 1e-6).all()


def test_entropy_and_logprob_under_a_two_token_constraint(model, full_logprobs):
  # At the root only 20 and 30 are allowed; then the stop token 2 alone.
  stop = 2
  c = constraints.trie_constraint([(20, stop), (30, stop)], 64)
  out = sampler.sample(model, PROMPTS, key=jax.random.key(0), max_new_tokens=N,
                       temperature=0.7, stop_tokens=[stop], constraint=c)
  np.testing.assert_array_equal(out.lengths, [2, 2, 2])
  for prompt, row, ent, lps in zip(PROMPTS, _rows(out), np.asarray(out.entropies)[:, :2],
                                   np.asarray(out.logprobs)[:, :2]):
    assert row[0] in (20, 30) and row[1] == stop
    logits = full_logprobs(prompt + row)[len(prompt) - 1:]
    # The renormalised two-token distribution at T: p = sigmoid((l20 - l30) / T).
    p = 1 / (1 + np.exp(-(logits[0, 20] - logits[0, 30]) / 0.7))
    np.testing.assert_allclose(ent, [-(p * np.log(p) + (1 - p) * np.log(1 - p)), 0.0],
                               atol=2e-5)
    # The log-probs stay those of the unmasked tempered distribution.
    tempered = _log_softmax(logits / 0.7)
    np.testing.assert_allclose(lps, [tempered[0, row[0]], tempered[1, stop]], atol=2e-4)
    assert lps[1] < -1e-3  # not the masked distribution's log 1


def test_choose_entropy_by_hand():
  params = sampler.SamplingParams(max_new_tokens=1, temperature=0.5)
  logits = jnp.array([[0.0, 1.0, 2.0, 3.0]])
  allowed = jnp.array([[False, True, False, True]])
  token, ent = sampler._choose(sampler._tempered(logits, params), allowed, jax.random.key(0),
                               params)
  assert int(token[0]) in (1, 3)
  # Tempered allowed logits 2 and 6: p = (1, e^4) / (1 + e^4).
  p = np.array([1.0, np.exp(4.0)]) / (1 + np.exp(4.0))
  np.testing.assert_allclose(ent, [-np.sum(p * np.log(p))], rtol=1e-5)
  greedy = dataclasses.replace(params, greedy=True)
  token, ent = sampler._choose(sampler._tempered(logits, greedy), allowed, None, greedy)
  assert int(token[0]) == 3 and float(ent[0]) == 0.0


def _parse(row, sequences, stop):
  """Splits `row` into allowed sequences, optionally ended by `stop`; None if it cannot."""
  items, i = [], 0
  while i < len(row):
    if row[i] == stop:
      return items if i == len(row) - 1 else None
    match = [s for s in sequences if row[i:i + len(s)] == list(s)]
    if not match:
      # An unfinished item may only be cut off by the end of the output.
      if any(list(s[:len(row) - i]) == row[i:] for s in sequences):
        return items
      return None
    items.append(tuple(match[0]))
    i += len(match[0])
  return items


def test_trie_constraint_only_emits_valid_sequences(model):
  sequences = [(20, 21, 22), (20, 23, 22), (30, 31, 22), (40, 22)]
  stop = 2
  c = constraints.trie_constraint(sequences, 64, root_tokens=[stop])
  seen = set()
  for seed in range(3):
    out = sampler.sample(model, PROMPTS, key=jax.random.key(seed), max_new_tokens=N,
                         temperature=3.0, stop_tokens=[stop], constraint=c)
    for row in _rows(out):
      items = _parse(row, sequences, stop)
      assert items is not None, row
      seen.update(items)
  assert len(seen) >= 2  # high temperature explores several items


def test_slate_constraint_emits_permutations_and_fails_when_dry(model):
  slates = [[(20, 21), (20, 22), (30, 31)], [(40, 41), (20, 21), (42, 41)],
            [(50, 51), (52, 53), (54, 55)]]
  kw = dict(key=jax.random.key(0), max_new_tokens=N, temperature=2.0)
  out = sampler.sample(model, PROMPTS, constraint=constraints.slate_constraint(slates, 64), **kw)
  for row, slate in zip(_rows(out), slates):
    items = [tuple(row[i:i + 2]) for i in range(0, N, 2)]
    assert sorted(items) == sorted(slate)
  # Row 1 now holds two items of two tokens: at step 4 nothing is left for it. (Same union of
  # items, so the compiled loop is reused.)
  dry = [slates[0], [(40, 41), (42, 41)], slates[2]]
  with pytest.raises(UserError, match="no allowed token at step 4 for row 1"):
    sampler.sample(model, PROMPTS, constraint=constraints.slate_constraint(dry, 64), **kw)


def test_full_cache_stops_rows_early(model, full_logprobs):
  # Token i is fed at slot length + i - 1, so a cache of 11 slots lets rows of 3, 5 and 2
  # prompt tokens generate 9, 7 and 10 tokens; at most 9 are asked for.
  out = sampler.sample(model, PROMPTS, key=jax.random.key(0), max_new_tokens=9, greedy=True,
                       cache_len=11)
  np.testing.assert_array_equal(out.lengths, [9, 7, 9])
  assert not np.asarray(out.done).any()
  for prompt, row in zip(PROMPTS, _rows(out)):
    assert row == _greedy_reference(full_logprobs, prompt, len(row))


def test_padded_array_input_matches_lists(model):
  tokens, lengths = sampler.pad_prompts(PROMPTS, pad_id=9, multiple=4)
  assert tokens.shape == (3, 8)
  np.testing.assert_array_equal(lengths, [3, 5, 2])
  np.testing.assert_array_equal(tokens[2], [13, 14, 9, 9, 9, 9, 9, 9])


def test_user_errors_before_compiling(model):
  key = jax.random.key(0)
  with pytest.raises(UserError, match="prompt 1 has 5 tokens but the KV cache holds 4"):
    sampler.sample(model, PROMPTS, key=key, max_new_tokens=2, cache_len=4)
  with pytest.raises(UserError, match="needs `lengths`"):
    sampler.sample(model, np.ones((2, 3), np.int32), key=key, max_new_tokens=2)
  with pytest.raises(UserError, match="prompt 1 is empty"):
    sampler.sample(model, [[1], []], key=key, max_new_tokens=2)
  with pytest.raises(UserError, match="stop token 99 is outside"):
    sampler.sample(model, PROMPTS, key=key, max_new_tokens=2, stop_tokens=[99])
  with pytest.raises(UserError, match="temperature"):
    sampler.sample(model, PROMPTS, key=key, max_new_tokens=2, temperature=0.0)
  with pytest.raises(UserError, match="built for 2 rows but the batch has 3"):
    sampler.sample(model, PROMPTS, key=key, max_new_tokens=2,
                   constraint=constraints.slate_constraint([[[1, 2]], [[3, 4]]], 64))
  with pytest.raises(UserError, match="vocabulary of 100"):
    sampler.sample(model, PROMPTS, key=key, max_new_tokens=2,
                   constraint=constraints.trie_constraint([[1, 2]], 100))
