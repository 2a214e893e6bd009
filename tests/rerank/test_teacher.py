"""The checkpoint teacher: sampled answers checked with Omega, target hint only when visible."""

from gr2_jax.rerank import teacher as teacher_lib
from gr2_jax.stages import traces
from tests.rerank.toy import ANSWER, EXAMPLE, ITEMS, PROMPT, SIDS, messages
from tests.rerank.toy import POSITIONS_EXAMPLE, POSITIONS_PROMPT


def test_checkpoint_teacher_samples_and_parses(memorised):
  model, tok = memorised
  t = teacher_lib.CheckpointTeacher(model, tok, ITEMS, SIDS, PROMPT, temperature=1e-3,
                                    max_new_tokens=80)
  outs = t.sample(EXAMPLE, target_visible=False, rng=0, num_samples=2)
  # Near-greedy sampling reproduces the memorised answer, which lists an item twice.
  assert [o.text for o in outs] == [ANSWER, ANSWER]
  assert outs[0].meta["reason"] == "duplicate" and outs[0].order == ()
  # The hint names the target only when it is visible; the plain prompt is the student's.
  assert t.messages(EXAMPLE, False) == messages()
  hint = t.messages(EXAMPLE, True)[1]["content"]
  assert hint.startswith(messages()[1]["content"]) and SIDS[EXAMPLE.target] in hint.split("\n")[-1]
  # In the trace stage its invalid answers are counted, never kept.
  records, stats = traces.generate(t, [EXAMPLE], [[0, 1, 0]], [0], SIDS, "rejection",
                                   max_tries=2)
  assert records == [] and stats["dropped"]["invalid_output"] == 1
  assert stats["invalid_answers"] == {"duplicate": 2}


def test_checkpoint_teacher_in_positions_format(memorised_positions):
  model, tok = memorised_positions
  t = teacher_lib.CheckpointTeacher(model, tok, ITEMS, SIDS, POSITIONS_PROMPT,
                                    temperature=1e-3, max_new_tokens=120)
  out = t.sample(POSITIONS_EXAMPLE, target_visible=False, rng=0)[0]
  # Parsed as numbers: the memorised answer lists 10 twice.
  assert out.meta["reason"] == "duplicate" and out.order == ()
  # The hint names the target by its number in the slate shown (item 2 is candidate 2).
  hint = t.messages(POSITIONS_EXAMPLE, True)[1]["content"].split("\n")[-1]
  assert hint == (f"The user watched candidate 2 ({SIDS[2]}) next: rank it first and explain "
                  "why it fits.")
