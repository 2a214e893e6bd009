"""Re-ranking with a checkpoint: a tiny model that memorised one answer (with a duplicate SID)
shows the Omega fallback to the legacy order and the slate constraint acting only inside the
ranking."""

import jax
import numpy as np

from gr2_jax.rerank import evaluate
from gr2_jax.sampling import sampler
from gr2_jax.text import chat
from tests.rerank.toy import ANSWER, EXAMPLE, ITEMS, PROMPT, SIDS, messages


def test_unconstrained_answer_is_the_greedy_sample_and_invalid_counts_as_legacy(memorised):
  model, tok = memorised
  res = evaluate.rerank(model, tok, [EXAMPLE, EXAMPLE, EXAMPLE], ITEMS, SIDS, PROMPT,
                        max_new_tokens=80, batch_size=1, constrained=(False,))[False]
  # Reference: one direct greedy call of the sampler on the same prompt.
  prompt = chat.encode_chat(messages(), tok, add_generation_prompt=True)
  ref = sampler.sample(model, [prompt], key=jax.random.key(1), max_new_tokens=80, greedy=True,
                       stop_tokens=chat.chat_stop_ids(tok), pad_id=tok.pad_id,
                       prompt_multiple=64)
  n = int(ref.lengths[0]) - 1  # the stop token is not part of the text
  assert res.texts == [tok.decode(np.asarray(ref.tokens[0, :n]).tolist())] * 3
  assert res.texts[0] == ANSWER  # memorised
  assert res.reasons == ["duplicate"] * 3 and not res.omega.any()
  np.testing.assert_array_equal(res.order, np.tile(np.arange(3), (3, 1)))  # legacy order
  d = evaluate.diagnostics(res)
  assert d["valid_rate"] == 0.0 and d["invalid_as_legacy"] == 3
  assert d["reasons"] == {"duplicate": 3}
  # The answer lists slate item 1, then item 1 again: one valid item before the fault.
  np.testing.assert_array_equal(res.prefix, [1, 1, 1])
  assert d["valid_prefix_hist"] == [0, 3, 0, 0] and d["mean_valid_prefix"] == 1.0


def test_constraint_acts_only_inside_the_ranking(memorised):
  model, tok = memorised
  res = evaluate.rerank(model, tok, [EXAMPLE], ITEMS, SIDS, PROMPT, max_new_tokens=80,
                        batch_size=1)
  free, cons = res[False], res[True]
  head = ANSWER[:ANSWER.index(evaluate.RANKING_KEY)]
  # The explanation (which cites a slate SID) is untouched; the ranking repeats no SID and
  # names only slate items, so the answer is a valid permutation.
  assert cons.texts[0].startswith(head)
  assert cons.omega[0], cons.texts[0]
  assert cons.order[0, 0] == 0  # the memorised first choice, slate item 1, survives
  assert sorted(cons.order[0]) == [0, 1, 2]
  assert not free.omega[0] and cons.forced == 0


def test_ranking_cut_finds_the_key(memorised):
  _, tok = memorised
  ids = tok.encode(ANSWER)
  j = evaluate.ranking_cut(tok, ids)
  assert evaluate.RANKING_KEY in tok.decode(ids[:j])
  assert evaluate.RANKING_KEY not in tok.decode(ids[:j - 1])
  assert evaluate.ranking_cut(tok, tok.encode('{"explanation": "x"}')) is None
