"""Rollouts: per-sample slate shuffles with the labels following, prompts showing that order,
and rewards read in shown positions."""

import jax
import numpy as np
import pytest

from gr2_jax.rl import rollout as rollout_lib
from tests.rerank import toy


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
  return toy.memorise(str(tmp_path_factory.mktemp("tok")))


def _slates():
  return {"history": np.array([[-1, 0]]), "slate": np.array([[1, 2, 3]]),
          "target_index": np.array([1]), "target": np.array([2]),
          "grades": np.array([[0, 2, 1]]), "labels": np.array([[0, 1, 1]])}


def _rollout(memorised, shuffle, seed=0):
  model, tok = memorised
  return rollout_lib.rollout(model, tok, _slates(), toy.ITEMS, toy.SIDS, toy.PROMPT,
                             group_size=6, shuffle=shuffle, key=jax.random.key(seed),
                             rng=np.random.default_rng(seed), max_new_tokens=48,
                             temperature=1.0, batch_size=4)


def test_shuffled_samples_carry_their_labels(memorised):
  _, tok = memorised
  ro = _rollout(memorised, shuffle=True)
  assert len(ro.texts) == 6 and ro.perm.shape == (6, 3)
  assert len({tuple(p) for p in ro.perm}) > 1  # the samples saw different orders
  slate = np.array([1, 2, 3])
  for i in range(6):
    shown = slate[ro.perm[i]]
    assert shown[ro.target_index[i]] == 2  # the target item, wherever it was shown
    np.testing.assert_array_equal(ro.grades[i], np.array([0, 2, 1])[ro.perm[i]])
    # The prompt lists the candidates in the shown order.
    text = tok.decode(ro.prompts[i])
    cands = text[text.index("Candidates"):]
    pos = [cands.index(toy.SIDS[int(x)]) for x in shown]
    assert pos == sorted(pos)
    assert len(ro.logps[i]) == len(ro.responses[i]) == ro.lengths[i]
  # Undoing the shuffle gives legacy positions: shown position j is legacy position perm[j].
  legacy = rollout_lib.legacy_order(ro)
  for i in range(6):
    np.testing.assert_array_equal(legacy[i], ro.perm[i][ro.order[i]])


def test_fixed_order_shows_the_legacy_slate_to_every_sample(memorised):
  ro = _rollout(memorised, shuffle=False)
  np.testing.assert_array_equal(ro.perm, np.tile(np.arange(3), (6, 1)))
  assert all(p == ro.prompts[0] for p in ro.prompts)
  np.testing.assert_array_equal(ro.target_index, np.ones(6))


def test_score_reads_orders_in_shown_positions():
  ro = rollout_lib.Rollouts(
      prompts=[[]] * 3, responses=[[]] * 3, logps=[np.zeros(0)] * 3, texts=[""] * 3,
      lengths=np.zeros(3, np.int32), finished=np.ones(3, bool),
      perm=np.array([[2, 0, 1], [0, 1, 2], [0, 1, 2]]), target_index=np.array([2, 0, 1]),
      grades=np.zeros((3, 3), np.int8), omega=np.array([True, True, False]),
      order=np.array([[2, 0, 1], [0, 1, 2], [0, 1, 2]]), reasons=["ok", "ok", "bad_json"],
      group_size=3)
  r = rollout_lib.score(ro, "rank_promotion", alpha=0.2, invalid_penalty=-1.0)
  # Row 0: target shown at 2 moved to 0: (2 - 0) / 3 + 0.2; row 1: first and stayed first:
  # 0 + 0.2; row 2: invalid.
  np.testing.assert_allclose(r["total"], [2 / 3 + 0.2, 0.2, -1.0], rtol=1e-6)
  r = rollout_lib.score(ro, "naive", alpha=0.2, invalid_penalty=-1.0)
  np.testing.assert_allclose(r["total"], [2 / 3 + 0.2, 0.2, -1.0], rtol=1e-6)


def test_constrained_ranking_lists_each_shown_item_once(memorised):
  model, tok = memorised
  ro = rollout_lib.rollout(model, tok, _slates(), toy.ITEMS, toy.SIDS, toy.PROMPT,
                           group_size=4, shuffle=True, key=jax.random.key(1),
                           rng=np.random.default_rng(1), max_new_tokens=64, temperature=1.0,
                           batch_size=4, constrain_ranking=True)
  for i in range(4):
    assert len(ro.logps[i]) == len(ro.responses[i])
    text = ro.texts[i]
    if '"recommendations"' not in text:
      continue
    ranking = text[text.index('"recommendations"'):]
    cited = [s for s in toy.SIDS if s in ranking]
    shown = {toy.SIDS[int(x)] for x in np.array([1, 2, 3])[ro.perm[i]]}
    # The memorised answer repeats one item; under the constraint no SID repeats or strays.
    assert set(cited) <= shown
    assert all(ranking.count(s) <= 1 for s in toy.SIDS)
    assert ro.reasons[i] not in ("duplicate", "foreign")
