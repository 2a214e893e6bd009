"""Beam search: width 1 is greedy decoding; a wide beam over a trie is exhaustive."""

import itertools

from flax import nnx
import jax
import numpy as np

from gr2_jax.models import qwen3
from gr2_jax.parallel import mesh as mesh_lib
from gr2_jax.sampling import beam
from gr2_jax.sampling import constraints
from gr2_jax.sampling import sampler

CFG = qwen3.get_model_config("tiny", vocab_size=24, num_layers=1, hidden_size=32, mlp_dim=64,
                             num_heads=2, num_kv_heads=1)
SEQS = [(20, a, b, 21) for a, b in itertools.product((3, 5, 7), (4, 6))]  # 6 "SIDs"


def _model():
  return mesh_lib.create_sharded_model(CFG, mesh_lib.single_device_mesh(), seed=1)


def test_width_one_is_greedy_and_wide_beam_is_exhaustive():
  model = _model()
  trie = constraints.trie_constraint(SEQS, CFG.vocab_size)
  prompts = [[1, 2, 9, 10], [11, 12]]
  toks, scores = beam.beam_search(model, prompts, beam_width=1, num_steps=4, constraint=trie)
  greedy = sampler.sample(model, prompts, key=jax.random.key(0), max_new_tokens=4, greedy=True,
                          constraint=trie)
  np.testing.assert_array_equal(toks[:, 0], greedy.tokens)
  np.testing.assert_allclose(scores[:, 0], greedy.logprobs.sum(1), rtol=1e-5)

  # Width = number of sequences: the beams are every sequence, ranked by exact log-prob.
  toks, scores = beam.beam_search(model, prompts, beam_width=len(SEQS), num_steps=4,
                                  constraint=trie)
  graphdef, state = nnx.split(model)
  score_all = jax.jit(lambda t: qwen3.apply(graphdef, state, t, np.arange(t.shape[1])[None]
                                            .repeat(t.shape[0], 0))[0])
  for b, p in enumerate(prompts):
    full = np.asarray([p + list(s) for s in SEQS])
    logp = np.asarray(jax.nn.log_softmax(score_all(full)))
    n = len(p)
    exact = np.array([sum(logp[i, n - 1 + j, s[j]] for j in range(4))
                      for i, s in enumerate(SEQS)])
    order = np.argsort(-exact)
    assert [tuple(t) for t in np.asarray(toks[b])] == [SEQS[i] for i in order]
    np.testing.assert_allclose(scores[b], exact[order], rtol=1e-4)
