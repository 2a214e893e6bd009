"""Shared-prefix KV reuse in the sampler against a full prefill of the same prompts."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gr2_jax.errors import UserError
from gr2_jax.sampling import sampler
from tests.sampling.test_sampler import random_tiny

# Two shared prefixes ("system turn + candidates" of two slates), four users' suffixes.
PREFIX_A = [3, 9, 4, 22, 17, 30, 11]
PREFIX_B = [3, 9, 4, 40, 41]
ROWS = [(PREFIX_A, [5, 6, 7]), (PREFIX_B, [8, 9, 10, 11, 12, 13]), (PREFIX_A, [14]),
        (PREFIX_A, [15, 16, 17, 18])]


@pytest.fixture(scope="module")
def model():
  return nnx.merge(*random_tiny())


def _prompts():
  return [p + s for p, s in ROWS], [len(p) for p, _ in ROWS]


def test_prefill_logits_and_cache_match_full_prefill(model):
  prompts, prefix_lengths = _prompts()
  cache = sampler.PrefixCache(model, multiple=4)
  pre = cache.gather(prompts, prefix_lengths, multiple=4)
  prefix_k, prefix_v, pre_lengths, row_prefix, tokens, suffix_lengths = pre
  assert pre_lengths.tolist() == [7, 5]  # two distinct prefixes, M already a power of two
  assert row_prefix.tolist() == [0, 1, 0, 0]
  graphdef, state = nnx.split(model)
  cache_len = 32
  logits, got = sampler.prefill_suffixes(
      graphdef, state, prefix_k, prefix_v, jnp.asarray(pre_lengths), jnp.asarray(row_prefix),
      jnp.asarray(tokens), jnp.asarray(suffix_lengths), cache_len=cache_len)
  full_tokens, full_lengths = sampler.pad_prompts(prompts)
  want_logits, want = sampler.prefill(graphdef, state, jnp.asarray(full_tokens),
                                      jnp.asarray(full_lengths), cache_len=cache_len)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(got["end"]), full_lengths)
  for b, n in enumerate(full_lengths):  # every valid slot of every row's cache
    for name in ("k", "v"):
      np.testing.assert_allclose(np.asarray(got[name][:, b, :n]), np.asarray(want[name][:, b, :n]),
                                 atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("greedy", [True, False])
def test_sample_matches_full_prefill(model, greedy):
  prompts, prefix_lengths = _prompts()
  kw = dict(key=jax.random.key(3), max_new_tokens=6, greedy=greedy, temperature=0.8,
            stop_tokens=(2,), cache_len=40)
  want = sampler.sample(model, prompts, **kw)
  cache = sampler.PrefixCache(model, multiple=8)
  got = sampler.sample(model, prompts, prefix_cache=cache, prefix_lengths=prefix_lengths, **kw)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
  np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5)
  assert (cache.misses, cache.hits) == (2, 0)
  again = sampler.sample(model, prompts, prefix_cache=cache, prefix_lengths=prefix_lengths, **kw)
  np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(want.tokens))
  assert (cache.misses, cache.hits) == (2, 2)


def test_default_cache_len_holds_every_token(model):
  prompts, prefix_lengths = _prompts()
  want = sampler.sample(model, prompts, key=jax.random.key(0), max_new_tokens=5, greedy=True)
  got = sampler.sample(model, prompts, key=jax.random.key(0), max_new_tokens=5, greedy=True,
                       prefix_cache=sampler.PrefixCache(model), prefix_lengths=prefix_lengths)
  np.testing.assert_array_equal(np.asarray(got.lengths), [5, 5, 5, 5])
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))


def test_lru_keeps_the_most_recent_prefixes(model):
  cache = sampler.PrefixCache(model, max_entries=2, multiple=4)
  for p in ([1, 2], [3, 4], [1, 2], [5, 6]):  # [3, 4] is the least recently used at the end
    cache.get(p)
  assert len(cache) == 2 and (cache.misses, cache.hits) == (3, 1)
  cache.get([1, 2])
  assert cache.hits == 2
  cache.get([3, 4])
  assert cache.misses == 4


def test_bad_prefixes_are_clear_errors(model):
  cache = sampler.PrefixCache(model)
  with pytest.raises(UserError, match="at least one token"):
    sampler.sample(model, [[1, 2, 3]], key=jax.random.key(0), max_new_tokens=2,
                   prefix_cache=cache, prefix_lengths=[3])
  with pytest.raises(UserError, match="both prefix_cache and prefix_lengths"):
    sampler.sample(model, [[1, 2, 3]], key=jax.random.key(0), max_new_tokens=2,
                   prefix_lengths=[1])
  with pytest.raises(UserError, match="2 prefix lengths for 1 prompts"):
    cache.gather([[1, 2, 3]], [1, 1])


def test_tight_default_cache_drops_only_padding(model):
  # Row 0 continues the longer prefix with a short suffix; its padded suffix reaches past the
  # cache (prefix 7 + suffix width 6 > longest prompt 11 + 1 new token): only padding is dropped.
  prompts, prefix_lengths = _prompts()
  for n in (1, 3):
    want = sampler.sample(model, prompts, key=jax.random.key(0), max_new_tokens=n, greedy=True)
    got = sampler.sample(model, prompts, key=jax.random.key(0), max_new_tokens=n, greedy=True,
                         prefix_cache=sampler.PrefixCache(model, multiple=1),
                         prefix_lengths=prefix_lengths)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5)
