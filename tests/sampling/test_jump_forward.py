"""Jump-forward decoding (tokens a constraint forces fed in chunks) against step-by-step decoding
and a cache-free reference forward."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gr2_jax.errors import UserError
from gr2_jax.sampling import constraints
from gr2_jax.sampling import sampler
from tests.sampling.test_sampler import random_tiny

STOP, SEP, CLOSE = 2, 40, 41
# SID-like items: A and B share their first code, so after 10 the model still chooses.
ITEMS = {"A": (10, 20, 30), "B": (10, 21, 31), "C": (11, 22, 32), "D": (12, 23, 33)}
SLATES = [("A", "B", "C", "D"), ("A", "C"), ("B", "C", "D")]
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
WIDTH = 32


def _constraint():
  rows = [[(k, [ITEMS[k] + (SEP,)], [ITEMS[k] + (CLOSE, STOP)]) for k in slate]
          for slate in SLATES]
  return constraints.list_constraint(rows, 64)


@pytest.fixture(scope="module")
def model():
  return nnx.merge(*random_tiny())


@pytest.fixture(scope="module")
def full_logits(model):
  """Logits of a cache-free forward of one sequence, [len, V]."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(tokens):
    logits, _ = nnx.merge(graphdef, state)(tokens[None], jnp.arange(WIDTH)[None])
    return logits[0]

  def run(seq):
    padded = np.zeros(WIDTH, np.int32)
    padded[:len(seq)] = seq
    return np.asarray(forward(jnp.asarray(padded)), np.float64)[:len(seq)]

  return run


def _rows(out):
  toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
  return [toks[b, :lens[b]].tolist() for b in range(len(lens))]


def _items(row):
  """The item names of an answer row (SEP / CLOSE separated, STOP last)."""
  assert row[-1] == STOP and row[-2] == CLOSE
  parts, cur = [], []
  for t in row[:-2] + [SEP]:
    if t == SEP:
      parts.append(next(k for k, v in ITEMS.items() if v == tuple(cur)))
      cur = []
    else:
      cur.append(t)
  return parts


@pytest.mark.parametrize("jump", [2, 3, 8])
def test_greedy_jump_forward_equals_step_by_step(model, jump):
  kw = dict(key=jax.random.key(0), max_new_tokens=24, greedy=True, stop_tokens=[STOP])
  ref = sampler.sample(model, PROMPTS, constraint=_constraint(), **kw)
  got = sampler.sample(model, PROMPTS, constraint=_constraint(), jump_forward=jump, **kw)
  assert _rows(got) == _rows(ref)
  for row, slate in zip(_rows(got), SLATES):
    assert sorted(_items(row)) == sorted(slate)  # a whole permutation of the row's items
  np.testing.assert_array_equal(got.lengths, [17, 9, 13])
  np.testing.assert_array_equal(got.done, ref.done)
  np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)
  np.testing.assert_array_equal(got.entropies, np.zeros_like(ref.entropies))


def test_without_forced_logprobs_the_tokens_stay_and_forced_logprobs_are_nan(model):
  """forced_logprobs=False (the LM head at each row's last chunk position only): the same greedy
  tokens; the picked tokens' log-probs as before, the forced ones' NaN."""
  kw = dict(key=jax.random.key(0), max_new_tokens=24, greedy=True, stop_tokens=[STOP],
            jump_forward=8)
  ref = sampler.sample(model, PROMPTS, constraint=_constraint(), **kw)
  got = sampler.sample(model, PROMPTS, constraint=_constraint(), forced_logprobs=False, **kw)
  assert _rows(got) == _rows(ref)
  lp, want = np.asarray(got.logprobs), np.asarray(ref.logprobs)
  for b, row in enumerate(_rows(got)):
    allowed = _allowed_along(_constraint(), b, row)
    for i in range(len(row)):
      if allowed[i].sum() > 1 or i == 0:  # a pick (the first token is always picked)
        np.testing.assert_allclose(lp[b, i], want[b, i], atol=1e-5)
  nan = np.isnan(lp)
  assert nan.sum() > 20 and not nan[:, 0].any()


def test_jump_forward_stops_at_the_token_budget(model):
  kw = dict(key=jax.random.key(0), max_new_tokens=6, greedy=True, stop_tokens=[STOP])
  ref = sampler.sample(model, PROMPTS, constraint=_constraint(), **kw)
  got = sampler.sample(model, PROMPTS, constraint=_constraint(), jump_forward=8, **kw)
  assert _rows(got) == _rows(ref)
  np.testing.assert_array_equal(got.lengths, [6, 6, 6])
  assert not np.asarray(got.done).any()


def _allowed_along(constraint, b, row):
  """bool [len(row), V]: what the constraint allows row b before each of its tokens."""
  state = jax.tree.map(lambda x: x[b:b + 1], constraint.init(len(SLATES)))
  out = []
  for t in row:
    out.append(np.asarray(constraint.allowed(state))[0])
    state = constraint.update(state, jnp.asarray([t], jnp.int32))
  return np.stack(out)


def test_sampled_logprobs_and_entropies_match_the_reference(model, full_logits):
  """Sampling with jump-forward: every answer is a permutation; a forced token's log-prob is
  the tempered model's at the position before it (from the chunk's logits) and its entropy 0;
  a picked token's entropy is that of the masked tempered distribution."""
  t = 0.8
  out = sampler.sample(model, PROMPTS, key=jax.random.key(7), max_new_tokens=24,
                       temperature=t, stop_tokens=[STOP], constraint=_constraint(),
                       jump_forward=8)
  forced_seen = 0
  for b, (prompt, row) in enumerate(zip(PROMPTS, _rows(out))):
    assert sorted(_items(row)) == sorted(SLATES[b])
    logits = full_logits(prompt + row)[len(prompt) - 1:len(prompt) - 1 + len(row)] / t
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    want_lp = logp[np.arange(len(row)), row]
    np.testing.assert_allclose(np.asarray(out.logprobs)[b, :len(row)], want_lp, atol=2e-4)
    allowed = _allowed_along(_constraint(), b, row)
    for i in range(len(row)):
      ent = float(np.asarray(out.entropies)[b, i])
      if allowed[i].sum() == 1:
        forced_seen += 1
        assert ent == 0.0
      else:
        z = np.where(allowed[i], logits[i], -np.inf)
        p = np.exp(z[allowed[i]] - z[allowed[i]].max())
        p /= p.sum()
        np.testing.assert_allclose(ent, -np.sum(p * np.log(p)), atol=2e-4)
  assert forced_seen > 20


def test_forced_run_by_hand():
  """After row 0 picks 10 the model still chooses (20 for A or 21 for B). Row 1 (A, C) picks
  11: the rest of C and the separator are forced, then A is the only item left, so all of it,
  the closing and the stop token: 9 tokens, the stop ends the run inside a chunk of 10. Row 2
  (B, C, D) picks 12: the rest of D and the separator, then B or C is a choice."""
  c = _constraint()
  picked = jnp.asarray([10, 11, 12], jnp.int32)
  state = c.update(c.init(3), picked)  # _forced_run continues from the state after the pick
  params = sampler.SamplingParams(max_new_tokens=24, greedy=True, jump_forward=10)
  chunk, n, _ = sampler._forced_run(  # pylint: disable=protected-access
      c, state, picked, jnp.ones(3, bool), jnp.zeros(3, jnp.int32), jnp.full(3, 24, jnp.int32),
      jnp.asarray([STOP], jnp.int32), params, 10)
  np.testing.assert_array_equal(n, [1, 9, 4])
  np.testing.assert_array_equal(np.asarray(chunk), [
      [10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
      [11, 22, 32, SEP, 10, 20, 30, CLOSE, STOP, 0],
      [12, 23, 33, SEP, 0, 0, 0, 0, 0, 0]])
  # A budget of 3 tokens cuts row 1's run after 22 and 32.
  _, n, _ = sampler._forced_run(  # pylint: disable=protected-access
      c, state, picked, jnp.ones(3, bool), jnp.zeros(3, jnp.int32), jnp.full(3, 3, jnp.int32),
      jnp.asarray([STOP], jnp.int32), params, 10)
  np.testing.assert_array_equal(n, [1, 3, 3])


def test_jump_forward_with_a_shared_prefix_equals_a_full_prefill(model):
  prefix = [3, 9, 4, 22, 17]
  prompts = [prefix + p for p in PROMPTS]
  kw = dict(key=jax.random.key(0), max_new_tokens=24, greedy=True, stop_tokens=[STOP])
  ref = sampler.sample(model, prompts, constraint=_constraint(), **kw)
  cache = sampler.PrefixCache(model, multiple=4)
  got = sampler.sample(model, prompts, constraint=_constraint(), jump_forward=8,
                       prefix_cache=cache, prefix_lengths=[len(prefix)] * 3, **kw)
  assert _rows(got) == _rows(ref)
  np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)


def test_bad_jump_forward_settings(model):
  with pytest.raises(UserError, match="jump_forward=1"):
    sampler.sample(model, PROMPTS, key=jax.random.key(0), max_new_tokens=4,
                   constraint=_constraint(), jump_forward=1)
  with pytest.raises(UserError, match="needs a constraint"):
    sampler.sample(model, PROMPTS, key=jax.random.key(0), max_new_tokens=4, jump_forward=4)
