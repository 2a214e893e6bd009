"""Trace generation: acceptance rules, rejection sampling with a scripted teacher, bad input,
and the tiny stage end to end on MovieLens-1M."""

import json
import os

import numpy as np
import pytest

from gr2_jax import config_lib
from gr2_jax import runner
from gr2_jax.data import slates as slates_lib
from gr2_jax.errors import UserError
from gr2_jax.sids import tokens as sid_lib
from gr2_jax.stages import traces
from gr2_jax.teachers import base
from gr2_jax.text import parser
from gr2_jax.text import prompts

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")
SIDS = [sid_lib.sid_tokens((i, 0)) for i in range(20)]


def tiny_config():
  config = config_lib.load_config_module(os.path.join(CONFIGS, "traces.py")).get_config("tiny")
  config.sids.embedding = "collaborative"  # the text encoder is not what this test is about
  return config


class ScriptedTeacher(base.Teacher):
  """Returns the scripted orders (slate positions) in turn; None gives a garbage answer."""

  def __init__(self, script, answer_format="sids"):
    self.script = list(script)
    self.calls = 0
    self.answer_format = answer_format

  def sample(self, example, *, target_visible, rng, num_samples=1):
    order = self.script[min(self.calls, len(self.script) - 1)]
    self.calls += 1
    if order is None:
      return [base.TeacherOutput(text='{"recommendations": [', order=(), meta={})]
    recs = prompts.recommendations(order, [SIDS[x] for x in example.slate], self.answer_format)
    return [base.TeacherOutput(text=prompts.render_answer(recs, "why"), order=tuple(order),
                               meta={})]


@pytest.mark.parametrize("order,rule,labels,expected", [
    ((2, 0, 1), "top1", (0, 0, 1), True),
    ((0, 2, 1), "top1", (0, 0, 1), False),
    ((1, 2, 0), "positives_first", (0, 1, 1), True),  # both positives before the negative
    ((1, 0, 2), "positives_first", (0, 1, 1), False),  # a positive after a negative
    ((0, 1, 2), "positives_first", (1, 1, 1), True),  # no negative: nothing to misorder
])
def test_acceptance_rules(order, rule, labels, expected):
  assert traces.accepted(order, 2 if rule == "top1" else 1, labels, rule) == expected


def test_rejection_counts_attempts_drops_and_garbage():
  ex = base.TeacherExample(history=(5, 6), slate=(0, 1, 2), target=2)
  labels = np.array([[0, 0, 1]] * 4)
  # Attempt 1 garbage, 2 wrong top item, 3 target first: accepted at attempt 3.
  teacher = ScriptedTeacher([None, (0, 1, 2), (2, 0, 1)])
  records, stats = traces.generate(teacher, [ex], labels, [7], SIDS, "rejection", max_tries=4)
  assert [(r[0], r[2]) for r in records] == [(0, 3)]
  assert stats["attempts"] == {3: 1}
  assert stats["invalid_answers"] == {"bad_json": 1}
  # Never accepted within max_tries: dropped as not accepted after exactly max_tries calls.
  teacher = ScriptedTeacher([(0, 1, 2)])
  records, stats = traces.generate(teacher, [ex], labels, [7], SIDS, "rejection", max_tries=4)
  assert records == [] and teacher.calls == 4 and stats["dropped"]["not_accepted"] == 1
  # Only garbage: dropped as invalid output.
  records, stats = traces.generate(ScriptedTeacher([None]), [ex], labels, [7], SIDS,
                                   "rejection", max_tries=2)
  assert records == [] and stats["dropped"]["invalid_output"] == 1
  assert stats["invalid_answers"] == {"bad_json": 2}


def test_answers_are_parsed_in_the_prompt_answer_format():
  ex = base.TeacherExample(history=(5, 6), slate=(0, 1, 2), target=2)
  labels = np.array([[0, 0, 1]])
  teacher = ScriptedTeacher([(2, 0, 1)], answer_format="positions")
  records, _ = traces.generate(teacher, [ex], labels, [7], SIDS, "rejection",
                               answer_format="positions")
  assert [(r[0], r[2]) for r in records] == [(0, 1)]
  assert json.loads(records[0][1].text)["recommendations"] == [3, 1, 2]
  # The same numbers read as SIDs are invalid answers.
  records, stats = traces.generate(ScriptedTeacher([(2, 0, 1)], answer_format="positions"),
                                   [ex], labels, [7], SIDS, "rejection", max_tries=1)
  assert records == [] and stats["invalid_answers"] == {"bad_sid": 1}


def test_bad_examples_are_counted_not_raised():
  good = base.TeacherExample(history=(5,), slate=(0, 1, 2), target=1)
  empty = base.TeacherExample(history=(5,), slate=(), target=1)
  foreign = base.TeacherExample(history=(5,), slate=(0, 1, 2), target=9)
  labels = np.zeros((3, 3))
  records, stats = traces.generate(ScriptedTeacher([(1, 0, 2)]), [good, empty, foreign],
                                   labels, [0, 1, 2], SIDS, "targeted")
  assert [r[0] for r in records] == [0]
  assert stats["dropped"] == {"empty_slate": 1, "target_not_in_slate": 1,
                              "invalid_output": 0, "not_accepted": 0}
  m = traces.summarize(3, records, stats, 1, [10.0])
  assert m["acceptance_rate"] == pytest.approx(1 / 3) and m["attempts_hist"] == [1]
  with pytest.raises(UserError, match="unknown trace mode"):
    traces.generate(ScriptedTeacher([(0,)]), [good], labels, [0], SIDS, "beam")


def test_tiny_traces_stage(tiny_workdir):
  config = tiny_config()
  out, summary = runner.run_stage(config, tiny_workdir, "traces")
  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f)
  legacy_dir = runner.artifact_dir(tiny_workdir, config, "legacy")
  train = slates_lib.load_split(legacy_dir, "train", max_examples=config.traces.max_examples,
                                seed=config.traces.seed)
  by_id = {int(e): i for i, e in enumerate(train["example_id"])}
  table = sid_lib.load_sid_table(runner.artifact_dir(tiny_workdir, config, "sids"))
  sids = [row["sid"] for row in table["items"]]
  for mode in ("targeted", "rejection"):
    with open(os.path.join(out, f"traces_{mode}.jsonl")) as f:
      recs = [json.loads(line) for line in f]
    m = report["modes"][mode]
    assert m["accepted"] == len(recs) and m["examples"] == len(train["slate"])
    assert sum(m["attempts_hist"]) == len(recs)
    assert m["accepted"] + sum(m["dropped"].values()) == m["examples"]
    for r in recs:
      i = by_id[r["example_id"]]
      assert r["slate"] == train["slate"][i].tolist() and r["mode"] == mode
      assert r["seed"] == [config.traces.seed, r["example_id"], traces.MODES.index(mode)]
      answer = r["messages"][-1]["content"]
      parsed = parser.parse_ranking(answer, [sids[x] for x in r["slate"]])
      # Every stored trace is valid and ranks the target first (single-target acceptance).
      assert parsed.omega and parsed.order[0] == train["target_index"][i]
      assert 1 <= r["attempt"] <= (1 if mode == "targeted" else config.traces.max_tries)
  assert report["modes"]["targeted"]["acceptance_rate"] == 1.0
  # The CF teacher beats the legacy order on validation R@1.
  assert summary["teacher_R@1"] > summary["legacy_R@1"]


def test_tiny_traces_stage_in_positions_format(tiny_workdir):
  config = tiny_config()
  config.traces.prompt.answer_format = "positions"
  out, _ = runner.run_stage(config, tiny_workdir, "traces")
  with open(os.path.join(out, "prompt.json")) as f:
    assert json.load(f)["answer_format"] == "positions"
  with open(os.path.join(out, "traces_rejection.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  assert recs
  for r in recs:
    system, user, answer = (m["content"] for m in r["messages"])
    assert '"recommendations": [number, ...]' in system
    candidates = user[user.index("Candidates (10):"):].split("\n")[1:]
    assert [c.split(". ")[0] for c in candidates] == [str(n) for n in range(1, 11)]
    # The answer ranks the shown numbers (the target first); the explanation cites SIDs.
    ranked = json.loads(answer)["recommendations"]
    assert ranked == [p + 1 for p in r["order"]] and ranked[0] == r["target_index"] + 1
    assert "<|sid_begin|>" in json.loads(answer)["explanation"]
    assert parser.parse_ranking(answer, r["slate"], "positions").omega


def test_shuffled_display_shows_the_slate_in_the_recorded_order(tiny_workdir):
  config = tiny_config()
  config.traces.prompt.answer_format = "positions"
  config.traces.shuffle_display = True
  out, _ = runner.run_stage(config, tiny_workdir, "traces")
  legacy = slates_lib.load_split(runner.artifact_dir(tiny_workdir, config, "legacy"), "train",
                                 max_examples=config.traces.max_examples, seed=config.traces.seed)
  by_id = {int(e): i for i, e in enumerate(legacy["example_id"])}
  with open(os.path.join(out, "traces_targeted.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  firsts = []
  for r in recs:
    i = by_id[r["example_id"]]
    # display[j] is the legacy position of the j-th shown candidate.
    assert sorted(r["display"]) == list(range(10))
    assert r["slate"] == [int(legacy["slate"][i][j]) for j in r["display"]]
    assert r["display"][r["target_index"]] == int(legacy["target_index"][i])
    ranked = json.loads(r["messages"][2]["content"])["recommendations"]
    assert ranked[0] == r["target_index"] + 1
    firsts.append(r["display"][0])
  # Not the legacy order: the first shown candidate is SASRec's top slot only by chance.
  assert np.mean(np.asarray(firsts) == 0) < 0.5


def test_shuffle_display_permutes_labels_with_the_slate():
  ex = [base.TeacherExample(history=(1,), slate=(10, 11, 12), target=12)]
  shown, labels, display = traces.shuffle_display(ex, np.array([[0, 1, 2]]), seed=3)
  assert shown[0].slate == tuple((10, 11, 12)[j] for j in display[0])
  np.testing.assert_array_equal(labels[0], display[0])  # label j was j
  assert shown[0].target == 12 and shown[0].history == (1,)
