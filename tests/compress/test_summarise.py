"""The compressor's greedy summaries under the no-repeat constraint (a random tiny model, whose
plain greedy decoding loops)."""

from flax import nnx
import jax
import ml_collections
import numpy as np

from gr2_jax.compress import train as compress_train
from tests.sampling.test_sampler import random_tiny


class _Tok:
  """The tokenizer fields `summarise` reads; the stop ids are outside what the model emits."""
  im_end_id, eos_id, pad_id, vocab_size = 62, 63, 0, 62

  def decode(self, ids):
    return " ".join(str(i) for i in ids)


def _repeats(row, n):
  grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
  return len(grams) - len(set(grams))


def test_greedy_summaries_never_repeat_a_trigram_and_sampled_ones_stay_free():
  model = nnx.merge(*random_tiny())
  prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [20, 21, 22, 23]]
  c = ml_collections.ConfigDict({"max_new_tokens": 32, "rollout_batch": 4, "temperature": 1.0,
                                 "no_repeat_ngram": 0})
  _, plain, _, _ = compress_train.summarise(model, _Tok(), prompts, c, greedy=True,
                                            key=jax.random.key(0))
  assert sum(_repeats(r, 3) for r in plain) > 0  # without the guard the model loops
  c.no_repeat_ngram = 3
  texts, guarded, _, _ = compress_train.summarise(model, _Tok(), prompts, c, greedy=True,
                                                  key=jax.random.key(0))
  assert all(_repeats(r, 3) == 0 for r in guarded)
  assert texts == [" ".join(map(str, r)) for r in guarded]
  # Each guarded row follows the plain one until the plain one first repeats a trigram.
  for p, g in zip(plain, guarded):
    first = next(i for i in range(len(p) + 1) if _repeats(p[:i], 3) > 0 or i == len(p))
    assert g[:first - 1] == p[:first - 1]
  # Sampled rollouts are not constrained: the same key gives the same rows with or without it.
  _, s_on, lp_on, _ = compress_train.summarise(model, _Tok(), prompts, c, greedy=False,
                                               key=jax.random.key(3))
  c.no_repeat_ngram = 0
  _, s_off, lp_off, _ = compress_train.summarise(model, _Tok(), prompts, c, greedy=False,
                                                 key=jax.random.key(3))
  assert s_on == s_off
  for a, b in zip(lp_on, lp_off):
    np.testing.assert_array_equal(a, b)
