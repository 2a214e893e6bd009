"""The "evidence" item field: training-period counts beside each candidate, computed by hand."""

import dataclasses

import numpy as np
import pytest

from gr2_jax.errors import UserError
from gr2_jax.teachers import base
from gr2_jax.teachers import cf_stats
from gr2_jax.teachers import evidence as evidence_lib
from gr2_jax.text import prompts

ITEMS = [{"id": i, "title": f"Film {i}", "year": 1990 + i, "genres": ["Drama"]}
         for i in range(5)]
SIDS = [f"<|sid_begin|><s_a_{i}><|sid_end|>" for i in range(5)]


def _stats():
  # Sequences (one user each, consecutive timestamps): 0 1 2 | 1 2 3 | 4 0, window 2.
  inter = {"user": np.array([0, 0, 0, 1, 1, 1, 2, 2], np.int32),
           "item": np.array([0, 1, 2, 1, 2, 3, 4, 0], np.int32),
           "timestamp": np.arange(8, dtype=np.int64),
           "period": np.zeros(8, np.int8), "rating": np.ones(8, np.float32)}
  return cf_stats.compute_stats(inter, ITEMS, window=2)


def test_counts_are_the_co_occurrences_with_the_shown_history_and_the_last_transition():
  ev = evidence_lib.SlateEvidence(_stats(), recent=2)
  # History 4, 0, 1 with recent=2 -> items 0 and 1; last item 1.
  # cooc(0, c) + cooc(1, c): pairs within 2 steps of one sequence, both directions.
  #   c=2: (0,2) in seq 1 -> 1; (1,2) in seq 1 and seq 2 -> 2; total 3.
  #   c=3: (1,3) in seq 2 -> 1.  c=4: (4,0) in seq 3 -> 1.
  # transitions 1 -> c: 1 -> 2 twice.
  cooc, follows = ev.counts((4, 0, 1), (2, 3, 4))
  np.testing.assert_array_equal(cooc, [3, 1, 1])
  np.testing.assert_array_equal(follows, [2, 0, 0])
  assert ev((4, 0, 1), (2, 3, 4)) == {2: "co-watched 3, followed last 2",
                                      3: "co-watched 1, followed last 0",
                                      4: "co-watched 1, followed last 0"}


def test_ranks_format_shows_each_count_s_rank_within_the_slate():
  ev = evidence_lib.SlateEvidence(_stats(), recent=2, fmt="ranks")
  # Counts of the test above: co-watched 3, 1, 1 -> ranks 1, 2, 2 (ties share the better rank);
  # followed last 2, 0, 0 -> #1, then zero counts read "none".
  assert ev((4, 0, 1), (2, 3, 4)) == {2: "co-watched #1, followed last #1",
                                      3: "co-watched #2, followed last none",
                                      4: "co-watched #2, followed last none"}
  np.testing.assert_array_equal(evidence_lib.slate_ranks([5, 9, 5, 0, 9]), [3, 1, 3, 5, 1])


def test_unknown_evidence_format_is_one_clear_error():
  with pytest.raises(UserError, match="evidence format must be one of counts, ranks"):
    evidence_lib.SlateEvidence(_stats(), recent=2, fmt="bars")
  with pytest.raises(UserError, match="evidence_format must be counts or ranks"):
    prompts.PromptConfig(evidence_format="bars")


def test_the_prompt_shows_evidence_on_candidates_only_and_it_follows_a_shuffle():
  ev = evidence_lib.SlateEvidence(_stats(), recent=2)
  slates = {"history": np.array([[-1, 4, 0, 1]]), "slate": np.array([[2, 3, 4]]),
            "target": np.array([3]), "user": np.array([0])}
  ex = base.examples_from_slates(slates, evidence=ev)[0]
  cfg = prompts.PromptConfig(item_fields=("sid", "title", "evidence"), answer_format="positions")
  shuffled = dataclasses.replace(ex, slate=(4, 2, 3))
  text = prompts.build_messages(prompts.with_sids(shuffled.history, ITEMS, SIDS),
                                prompts.with_sids(shuffled.slate, ITEMS, SIDS, ex.evidence),
                                cfg)[1]["content"]
  assert text.endswith(
      "Candidates (3):\n"
      "1. <|sid_begin|><s_a_4><|sid_end|> Film 4 | co-watched 1, followed last 0\n"
      "2. <|sid_begin|><s_a_2><|sid_end|> Film 2 | co-watched 3, followed last 2\n"
      "3. <|sid_begin|><s_a_3><|sid_end|> Film 3 | co-watched 1, followed last 0")
  assert "History (oldest first):\n<|sid_begin|><s_a_4><|sid_end|> Film 4\n" in text
  assert "Items: SID title | evidence." in prompts.system_text(cfg)


def test_no_evidence_field_builds_no_statistics(tmp_path):
  cfg = prompts.PromptConfig()
  assert "evidence" not in cfg.item_fields
  assert evidence_lib.for_prompt(cfg, str(tmp_path / "no_data_here")) is None
