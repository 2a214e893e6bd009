"""Rollouts: per-sample slate shuffles, prompts showing that order, answers parsed in shown
positions and scored in legacy positions, so that a reward does not depend on the shuffle."""

import dataclasses
import re

import jax
import numpy as np
import pytest

from gr2_jax.rl import algorithm
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
    # Labels stay in legacy positions, whatever the sample was shown.
    assert slate[ro.target_index[i]] == 2
    np.testing.assert_array_equal(ro.grades[i], [0, 2, 1])
    # The prompt lists the candidates in the shown order.
    text = tok.decode(ro.prompts[i])
    cands = text[text.index("Candidates"):]
    pos = [cands.index(toy.SIDS[int(x)]) for x in shown]
    assert pos == sorted(pos)
    assert len(ro.logps[i]) == len(ro.responses[i]) == len(ro.entropies[i]) == ro.lengths[i]
  # Undoing the shuffle gives legacy positions: shown position j is legacy position perm[j].
  legacy = rollout_lib.legacy_order(ro)
  for i in range(6):
    np.testing.assert_array_equal(legacy[i], ro.perm[i][ro.order[i]])


def test_fixed_order_shows_the_legacy_slate_to_every_sample(memorised):
  ro = _rollout(memorised, shuffle=False)
  np.testing.assert_array_equal(ro.perm, np.tile(np.arange(3), (6, 1)))
  assert all(p == ro.prompts[0] for p in ro.prompts)
  np.testing.assert_array_equal(ro.target_index, np.ones(6))


def _rollouts(perm, order, target, omega, grades=None):
  n = len(perm)
  return rollout_lib.Rollouts(
      prompts=[[]] * n, responses=[[]] * n, logps=[np.zeros(0)] * n,
      entropies=[np.zeros(0)] * n, texts=[""] * n,
      lengths=np.zeros(n, np.int32), finished=np.ones(n, bool), perm=np.array(perm),
      target_index=np.array(target),
      grades=np.zeros((n, 3), np.int8) if grades is None else np.array(grades),
      omega=np.array(omega), order=np.array(order), reasons=["ok"] * n, group_size=n)


def test_score_maps_shown_positions_back_to_the_legacy_order():
  # Legacy slate positions 0, 1, 2; the target is legacy position 2.
  ro = _rollouts(perm=[[2, 0, 1], [0, 1, 2], [0, 1, 2]], order=[[1, 0, 2], [2, 0, 1], [0, 1, 2]],
                 target=[2, 2, 2], omega=[True, True, False])
  np.testing.assert_array_equal(rollout_lib.legacy_order(ro)[:2], [[0, 2, 1], [2, 0, 1]])
  r = rollout_lib.score(ro, "rank_promotion", alpha=0.2, invalid_penalty=-1.0)
  # Row 0 ranks legacy [0, 2, 1]: the target moved 2 -> 1: 1/3 + 0.2. Row 1 ranks it first:
  # 2/3 + 0.2. Row 2 is invalid.
  np.testing.assert_allclose(r["total"], [1 / 3 + 0.2, 2 / 3 + 0.2, -1.0], rtol=1e-6)
  r = rollout_lib.score(ro, "naive", alpha=0.2, invalid_penalty=-1.0)
  np.testing.assert_allclose(r["total"], [1 / 3 + 0.2, 2 / 3 + 0.2, -1.0], rtol=1e-6)


@pytest.mark.parametrize("reward", ["rank_promotion", "naive", "auc", "graded_ndcg"])
def test_same_ranking_under_different_shuffles_gets_the_same_reward(reward):
  # Both samples rank the legacy positions [2, 0, 1]; sample 0 was shown [2, 0, 1] (so its
  # answer reads as the shown order [0, 1, 2]), sample 1 was shown [1, 2, 0].
  ro = _rollouts(perm=[[2, 0, 1], [1, 2, 0]], order=[[1, 2, 0], [1, 2, 0]], target=[2, 2],
                 omega=[True, True], grades=[[0, 0, 2], [0, 0, 2]])
  ro.order[0] = [0, 1, 2]
  np.testing.assert_array_equal(rollout_lib.legacy_order(ro), [[2, 0, 1], [2, 0, 1]])
  total = rollout_lib.score(ro, reward, alpha=0.2, invalid_penalty=-1.0)["total"]
  # The target (legacy rank 2) ranked first: 2/3 + 0.2 for rank_promotion and naive. The first
  # sample copies what it was shown, but that order was optimal: AUC 1 (NDCG 1) + 0.2.
  assert total[0] == pytest.approx(total[1])
  assert total[0] == pytest.approx(2 / 3 + 0.2 if reward in ("rank_promotion", "naive") else 1.2)
  adv = np.asarray(algorithm.plan_update(total[None], np.ones(1, bool), algorithm.GRPO,
                                         1).advantages)
  np.testing.assert_allclose(adv, 0.0, atol=1e-6)


def test_constrained_ranking_lists_each_shown_item_once(memorised):
  model, tok = memorised
  ro = rollout_lib.rollout(model, tok, _slates(), toy.ITEMS, toy.SIDS, toy.PROMPT,
                           group_size=4, shuffle=True, key=jax.random.key(1),
                           rng=np.random.default_rng(1), max_new_tokens=64, temperature=1.0,
                           batch_size=4, constrain_ranking=True)
  checked = 0
  for i in range(4):
    assert len(ro.logps[i]) == len(ro.responses[i]) == len(ro.entropies[i])
    text = ro.texts[i]
    if '"recommendations"' not in text:
      continue  # a free head that never opened the ranking keeps its free text
    checked += 1
    ranking = text[text.index('"recommendations"'):]
    cited = [s for s in toy.SIDS if s in ranking]
    shown = {toy.SIDS[int(x)] for x in np.array([1, 2, 3])[ro.perm[i]]}
    # The memorised answer repeats one item; under the constraint no SID repeats or strays.
    assert set(cited) <= shown
    assert all(ranking.count(s) <= 1 for s in toy.SIDS)
    assert ro.reasons[i] not in ("duplicate", "foreign")
  assert checked >= 2, ro.texts


@pytest.fixture(scope="module")
def memorised_positions(tmp_path_factory):
  return toy.memorise(str(tmp_path_factory.mktemp("tok_positions")), toy.POSITIONS_ANSWER,
                      toy.POSITIONS_PROMPT, toy.POSITIONS_EXAMPLE)


def test_constrained_positions_list_each_number_once(memorised_positions):
  model, tok = memorised_positions
  slate = np.array([toy.POSITIONS_EXAMPLE.slate])
  slates = {"history": np.array([[-1, 0]]), "slate": slate, "target_index": np.array([1]),
            "target": np.array([2]), "grades": (slate == 2).astype(np.int8),
            "labels": (slate == 2).astype(np.int8)}
  ro = rollout_lib.rollout(model, tok, slates, toy.ITEMS, toy.SIDS, toy.POSITIONS_PROMPT,
                           group_size=4, shuffle=True, key=jax.random.key(1),
                           rng=np.random.default_rng(1), max_new_tokens=120, temperature=1.0,
                           batch_size=4, constrain_ranking=True)
  checked = 0
  for i in range(4):
    # The prompt numbers the candidates in the order this sample was shown.
    text = tok.decode(ro.prompts[i])
    first = toy.SIDS[int(slate[0, ro.perm[i][0]])]
    assert f"Candidates (12):\n1. {first}" in text
    if '"recommendations"' not in ro.texts[i]:
      continue
    checked += 1
    listed = re.findall(r"\d+", ro.texts[i][ro.texts[i].index('"recommendations"'):])
    # The memorised answer repeats 10; under the constraint no number repeats or strays.
    assert len(set(listed)) == len(listed) and all(1 <= int(n) <= 12 for n in listed)
    assert ro.reasons[i] not in ("duplicate", "foreign")
    if ro.omega[i]:
      assert sorted(ro.order[i]) == list(range(12))
  assert checked >= 2, ro.texts


def test_list_rollouts_with_jump_forward_are_permutations(memorised):
  """The reasoning-free prompt (answer head prefilled) sampled under the strict list constraint,
  forced tokens fed in chunks: every answer is a permutation of its shown slate, with one
  log-prob and one entropy per response token, and the forced tokens' entropies are 0."""
  model, tok = memorised
  cfg = dataclasses.replace(toy.PROMPT, reasoning=False, answer_head=True)
  ro = rollout_lib.rollout(model, tok, _slates(), toy.ITEMS, toy.SIDS, cfg, group_size=4,
                           shuffle=True, key=jax.random.key(2), rng=np.random.default_rng(2),
                           max_new_tokens=64, temperature=1.0, batch_size=4,
                           constrain_ranking=True, jump_forward=8)
  assert ro.omega.all(), ro.reasons
  assert ro.finished.all()
  for i in range(4):
    assert sorted(ro.order[i]) == [0, 1, 2]
    assert len(ro.logps[i]) == len(ro.responses[i]) == len(ro.entropies[i])
    assert np.isfinite(ro.logps[i]).all() and (ro.logps[i] <= 0).all()
  zero = sum(int((e == 0).sum()) for e in ro.entropies)
  total = sum(len(e) for e in ro.entropies)
  assert 0 < zero < total  # forced tokens (point masses) and drawn ones
