"""The no-repeat n-gram constraint: stepped by hand against a brute-force reference, and in greedy
decoding against a cache-free forward of a random model."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gr2_jax.errors import UserError
from gr2_jax.sampling import constraints
from gr2_jax.sampling import sampler
from tests.sampling.test_sampler import random_tiny

_ALLOWED = jax.jit(lambda c, state: c.allowed(state))
_UPDATE = jax.jit(lambda c, state, tokens: c.update(state, tokens))


def _banned(seq, n):
  """Brute force: the tokens that would complete an n-gram already in `seq`."""
  seq = list(seq)
  if len(seq) < n - 1:
    return set()
  tail = tuple(seq[len(seq) - (n - 1):]) if n > 1 else ()
  return {seq[i + n - 1] for i in range(len(seq) - n + 1)
          if tuple(seq[i:i + n - 1]) == tail}


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_allowed_matches_brute_force(n):
  """Rows drawn from 3 tokens repeat n-grams often; every step's ban equals the reference, and
  past max_len everything is allowed."""
  v, max_len, steps = 7, 20, 24
  rng = np.random.default_rng(n)
  seqs = rng.integers(0, 3, size=(3, steps))
  c = constraints.no_repeat_ngram(n, v, max_len)
  state = c.init(3)
  bans_seen = 0
  for s in range(steps + 1):
    allowed = np.asarray(_ALLOWED(c, state))
    for b in range(3):
      want = (set(range(v)) - _banned(seqs[b, :s], n)) if s <= max_len else set(range(v))
      assert set(np.flatnonzero(allowed[b]).tolist()) == want, (n, s, b)
      bans_seen += v - len(want)
    if s < steps:
      state = _UPDATE(c, state, jnp.asarray(seqs[:, s], jnp.int32))
  assert bans_seen > 10  # the draws do exercise the ban


def test_by_hand():
  # Generated 3 4 5 3 4: the trigram "3 4 5" exists, so after "3 4" the token 5 is banned;
  # bigrams (n=2): after "4", 5 is banned.
  for n, want_banned in ((3, {5}), (2, {5})):
    c = constraints.no_repeat_ngram(n, 8, 16)
    state = c.init(1)
    for t in (3, 4, 5, 3, 4):
      state = _UPDATE(c, state, jnp.asarray([t], jnp.int32))
    allowed = np.asarray(_ALLOWED(c, state))[0]
    assert set(np.flatnonzero(~allowed).tolist()) == want_banned


def test_bad_settings():
  with pytest.raises(UserError, match="n-gram size"):
    constraints.no_repeat_ngram(0, 8, 16)
  with pytest.raises(UserError, match="track"):
    constraints.no_repeat_ngram(3, 8, 0)


def test_greedy_decoding_never_repeats_an_ngram_and_takes_the_best_allowed_token():
  """The random tiny model loops under plain greedy decoding; with the constraint no trigram
  repeats, and each token is the argmax of the cache-free logits over the tokens the brute-force
  reference allows."""
  model = nnx.merge(*random_tiny())
  prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
  n, new = 3, 40
  plain = sampler.sample(model, prompts, key=jax.random.key(0), max_new_tokens=new, greedy=True)
  plain_rows = np.asarray(plain.tokens)

  def repeats(row):
    grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
    return len(grams) - len(set(grams))

  assert sum(repeats(r.tolist()) for r in plain_rows) > 0  # the test would be empty otherwise
  c = constraints.no_repeat_ngram(n, model.cfg.vocab_size, new)
  out = sampler.sample(model, prompts, key=jax.random.key(0), max_new_tokens=new, greedy=True,
                       constraint=c)
  graphdef, state = nnx.split(model)
  width = 64

  @jax.jit
  def forward(tokens):
    logits, _ = nnx.merge(graphdef, state)(tokens[None], jnp.arange(width)[None])
    return logits[0]

  for b, prompt in enumerate(prompts):
    row = np.asarray(out.tokens)[b].tolist()
    assert len(row) == new and repeats(row) == 0
    padded = np.zeros(width, np.int32)
    seq = prompt + row
    padded[:len(seq)] = seq
    logits = np.asarray(forward(jnp.asarray(padded)))
    for i, t in enumerate(row):
      z = logits[len(prompt) - 1 + i].copy()
      z[list(_banned(row[:i], n))] = -np.inf
      top = np.sort(z)[-2:]
      if top[1] - top[0] > 1e-4:  # no near-tie that float rounding could flip
        assert t == int(np.argmax(z)), (b, i)
