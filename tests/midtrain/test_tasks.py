"""Task documents, their layouts and the token mix."""

import numpy as np
import pytest

from gr2_jax.errors import UserError
from gr2_jax.midtrain import tasks

ITEMS = [{"id": 0, "title": "Toy Story", "year": 1995, "genres": ["Animation", "Comedy"],
          "description": ""},
         {"id": 1, "title": "Heat", "year": 1995, "genres": ["Action"], "description": "Cops."},
         {"id": 2, "title": "Fargo", "year": None, "genres": [], "description": ""}]
SIDS = ["<A>", "<B>", "<C>"]


def test_documents():
  ex = {"period": np.array([1, 2]), "history": np.array([[-1, 0, 2], [0, 1, 2]]),
        "target": np.array([1, 0])}
  assert tasks.sequential_docs(ex, SIDS, 5) == ["History: <A><C>\nNext: <B>"]
  assert tasks.sequential_docs(ex, SIDS, 1) == ["History: <C>\nNext: <B>"]
  assert tasks.caption_docs(ITEMS, SIDS, [0]) == [
      "<A> title: Toy Story\nyear: 1995\ngenres: Animation, Comedy",
      "title: Toy Story (1995)\nsid: <A>"]
  assert tasks.text_docs(ITEMS) == ["Toy Story (1995) is a Animation, Comedy movie.",
                                    "Heat (1995) is a Action movie. Cops.",
                                    "Fargo is a unclassified movie."]
  users = [{"age": 25, "gender": "F", "occupation": 12}]
  inter = {"user": np.array([0, 0, 0, 0]), "item": np.array([0, 1, 0, 2])}
  docs = tasks.persona_docs(users, ITEMS, inter, np.array([1, 1, 1, 0], bool), SIDS, 2)
  assert docs == ["User: 25-34, female, programmer. Likes Animation, Comedy, Action.\n"
                  "Watched: <B><A>",
                  "User: 25-34, female, programmer. Likes Animation, Comedy, Action.\n"
                  "Watched: <A>"]


def test_slate_documents_answer_target_first_then_legacy_order():
  slates = {"history": np.array([[-1, 1, 2], [0, 1, 2]]), "slate": np.array([[0, 1, 2], [2, 1, 0]]),
            "target_index": np.array([2, 0])}
  shown_orders = set()
  for seed in range(8):
    docs = tasks.slate_docs(slates, SIDS, 2, seed)
    assert len(docs) == 2
    # Slate 0 = <A><B><C>, target <C>; slate 1 = <C><B><A>, target <C>: the answer is the
    # target, then the others in the slate's (legacy) order, whatever order they are shown in.
    for doc, answer_sids in zip(docs, (("<C>", "<A>", "<B>"), ("<C>", "<B>", "<A>"))):
      head, cands, answer = doc.split("\n")
      assert head == "History: <B><C>"  # the last max_items=2 of the history
      assert cands.startswith("Candidates: ")
      shown = [x + ">" for x in cands[len("Candidates: "):].split(">")[:-1]]
      assert sorted(shown) == ["<A>", "<B>", "<C>"]
      assert answer == '{"recommendations": ["%s", "%s", "%s"]}' % answer_sids
      shown_orders.add(cands)
  assert len(shown_orders) > 1  # the candidates are shown in a seeded shuffle
  assert tasks.slate_prompt(["<A>"], ["<B>", "<C>"]) == "History: <A>\nCandidates: <B><C>\n"


def test_mix_shares_tokens_and_rejects_zero():
  shares = tasks.parse_mix({"sequential": 3, "caption": 1})
  np.testing.assert_allclose(shares, [0.75, 0.25, 0, 0, 0])
  pools = [[np.zeros(10)] * 4, [np.zeros(5)] * 2, [], [], []]
  ex, ids = tasks.mix_examples(pools, shares, 200, seed=0)
  counts = np.bincount(ids, minlength=5)
  # 150 tokens of 10-token docs, 50 of 5-token docs (the small pool repeats).
  assert counts.tolist() == [15, 10, 0, 0, 0] and len(ex) == 25
  with pytest.raises(UserError, match="sums to zero"):
    tasks.parse_mix({"sequential": 0.0})
  with pytest.raises(UserError, match="unknown mid-training task"):
    tasks.parse_mix({"captions": 1.0})
