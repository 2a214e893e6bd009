"""Tests of Omega: hand cases per reason code and a never-raises property test."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st
import numpy as np
import pytest

from gr2_jax.sids import tokens
from gr2_jax.text import parser
from gr2_jax.text import prompts

SLATE = [tokens.sid_tokens(c) for c in ((1, 2, 3, 0), (4, 5, 6, 0), (7, 8, 9, 0))]
A, B, C = SLATE
OTHER = tokens.sid_tokens((1, 2, 3, 1))


def answer(recs, explanation="because"):
  return prompts.render_answer(recs, explanation)


def test_ok_with_explanation_and_order():
  r = parser.parse_ranking(answer([C, A, B]), SLATE)
  assert r == parser.ParseResult(True, (2, 0, 1), "ok", "because", 3)


@pytest.mark.parametrize("text", [
    "  " + answer([C, A, B]) + "\n",
    answer([C, A, B]) + "<|im_end|>",
    answer([C, A, B]) + " <|im_end|>\n<|endoftext|>",
    'Let me think {"explanation": "draft", "recommendations": []}\n' + answer([C, A, B]),
    "I rank them so: " + answer([C, A, B]),
    '{"recommendations": ["' + C + '", "' + A + '", "' + B + '"]}',
    '{"recommendations": [" ' + C + '", "' + A + ' ", "' + B + '"]}',
])
def test_accepted_forms(text):
  r = parser.parse_ranking(text, SLATE)
  assert (r.omega, r.order, r.reason) == (True, (2, 0, 1), "ok")


@pytest.mark.parametrize("text,reason", [
    ("", "no_json"),
    ("I like " + C + " best", "no_json"),
    (answer([C, A, B])[:-1], "bad_json"),  # truncated
    (answer([C, A, B])[:40], "bad_json"),
    (answer([C, A, B]) + " Hope this helps.", "bad_json"),  # text after the object
    ("{'recommendations': []}", "bad_json"),  # not JSON quoting
    ('{"explanation": "x"}', "missing_key"),
    ('{"recommendations": "' + A + '"}', "not_a_list"),
    ('{"recommendations": {"a": 1}}', "not_a_list"),
    (answer([C, "<|sid_begin|><s_a_1><s_b_2><|sid_end|", B]), "bad_sid"),
    (answer([C, A + B]), "bad_sid"),
    (answer([C, 3, B]), "bad_sid"),
    (answer([C, "<|sid_begin|><s_b_1><s_a_2><|sid_end|>", B]), "bad_sid"),
    (answer([C, "<|sid_begin|><s_a_01><s_b_2><s_c_3><s_d_0><|sid_end|>", B]), "bad_sid"),
    (answer([C, OTHER, B]), "foreign"),
    (answer([C, A, B, OTHER]), "foreign"),
    (answer([C, A, A]), "duplicate"),
    (answer([C, A, B, B]), "duplicate"),
    (answer([C, A]), "missing"),
    (answer([]), "missing"),
    ('{"recommendations": ' + "[" * 100000 + "]" * 100000 + "}", "bad_json"),  # too deep
    ("{" * 3000, "bad_json"),
])
def test_reason_codes(text, reason):
  r = parser.parse_ranking(text, SLATE)
  assert (r.omega, r.order, r.reason) == (False, None, reason)


@pytest.mark.parametrize("text,prefix", [
    ("nothing", 0),
    (answer([]), 0),
    (answer([OTHER, A, B]), 0),
    (answer([C, OTHER, B]), 1),
    (answer([C, "x", B]), 1),
    (answer([C, A, A]), 2),
    (answer([C, A]), 2),
    (answer([C, A, B, OTHER]), 3),
])
def test_valid_prefix_counts_distinct_slate_items_before_the_first_fault(text, prefix):
  assert parser.parse_ranking(text, SLATE).prefix == prefix


def test_explanation_kept_on_failure_and_empty_slate():
  assert parser.parse_ranking(answer([C, A]), SLATE).explanation == "because"
  assert parser.parse_ranking(answer([]), []).reason == "empty_slate"
  assert parser.parse_ranking(None, SLATE).reason == "no_json"


def test_repeated_sid_in_slate_takes_positions_in_order():
  slate = [A, B, A]
  assert parser.parse_ranking(answer([A, B, A]), slate).order == (0, 1, 2)
  assert parser.parse_ranking(answer([A, A, B]), slate).order == (0, 2, 1)
  assert parser.parse_ranking(answer([A, B, B]), slate).reason == "duplicate"


def test_parse_batch():
  texts = [answer([C, A, B]), answer([C, A]), "nothing"]
  omega, order, reasons, prefix = parser.parse_batch(texts, [SLATE] * 3)
  np.testing.assert_array_equal(omega, [True, False, False])
  np.testing.assert_array_equal(prefix, [3, 2, 0])
  np.testing.assert_array_equal(order, [[2, 0, 1], [0, 1, 2], [0, 1, 2]])
  assert reasons == ["ok", "missing", "no_json"]
  with pytest.raises(ValueError):
    parser.parse_batch(texts, [SLATE, SLATE[:2], SLATE])


def _mutate(draw):
  """A valid answer, then one random mutation of its text or of its SID list."""
  perm = draw(st.permutations(SLATE))
  kind = draw(st.sampled_from(["truncate", "swap", "dup", "delete", "insert", "bytes",
                               "foreign", "none"]))
  recs = list(perm)
  text = answer(recs, draw(st.text(max_size=30)))
  if kind == "truncate":
    text = text[:draw(st.integers(0, len(text)))]
  elif kind == "swap" and len(recs) > 1:
    i, j = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    recs[i], recs[j] = recs[j], recs[i]
    text = answer(recs)
  elif kind == "dup":
    recs[draw(st.integers(0, 2))] = recs[draw(st.integers(0, 2))]
    text = answer(recs)
  elif kind == "delete":
    del recs[draw(st.integers(0, 2))]
    text = answer(recs)
  elif kind == "foreign":
    recs[draw(st.integers(0, 2))] = OTHER
    text = answer(recs)
  elif kind in ("insert", "bytes"):
    pos = draw(st.integers(0, len(text)))
    junk = (draw(st.binary(max_size=8)).decode("latin-1") if kind == "bytes"
            else draw(st.text(alphabet='{}[]",: \\<>|_', max_size=6)))
    text = text[:pos] + junk + text[pos:]
  return text, recs, kind


def _check(text):
  r = parser.parse_ranking(text, SLATE)
  assert r.reason in parser.REASONS
  assert r.omega == (r.reason == "ok")
  if r.omega:  # an accepted answer is always a permutation of exactly the slate
    assert sorted(r.order) == [0, 1, 2]
  else:
    assert r.order is None
  return r


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=200))
def test_never_raises_on_random_strings(text):
  _check(text)


@settings(max_examples=1000, deadline=None)
@given(st.data())
def test_never_raises_on_mutations(data):
  text, recs, kind = _mutate(data.draw)
  r = _check(text)
  if kind in ("swap", "none"):
    assert r.omega and [SLATE[i] for i in r.order] == recs
  if kind in ("dup", "delete", "foreign") and sorted(recs) != sorted(SLATE):
    assert not r.omega


# The "positions" answer format: the numbers 1..3 of the shown candidates.


def numbers(recs, explanation="because"):
  return json.dumps({"explanation": explanation, "recommendations": recs})


def positions(text, slate=SLATE):
  return parser.parse_ranking(text, slate, "positions")


def test_positions_ok():
  assert positions(numbers([3, 1, 2])) == parser.ParseResult(True, (2, 0, 1), "ok", "because", 3)
  # The SIDs themselves are not read: only the slate's size matters.
  assert positions(numbers([2, 1]), ["x", "y"]).order == (1, 0)


@pytest.mark.parametrize("text", [
    "  " + numbers([3, 1, 2]) + "\n",
    numbers([3, 1, 2]) + " <|im_end|>\n<|endoftext|>",
    'Let me think {"recommendations": [1]}\n' + numbers([3, 1, 2]),
    '{"recommendations": [3,1,2]}',
    '{"recommendations": [ 3 ,\n 1 , 2 ]}',
])
def test_positions_accepted_forms(text):
  assert (positions(text).omega, positions(text).order) == (True, (2, 0, 1))


@pytest.mark.parametrize("text,reason,prefix", [
    ("", "no_json", 0),
    ("I rank 3, 1, 2", "no_json", 0),
    (numbers([3, 1, 2])[:-2], "bad_json", 0),  # truncated
    (numbers([3, 1, 2]) + " Done.", "bad_json", 0),
    ('{"recommendations": [' + "1" * 5000 + "]}", "bad_json", 0),  # beyond Python's int limit
    ('{"recommendations": [03, 1, 2]}', "bad_json", 0),  # JSON has no leading zeros
    ('{"explanation": "x"}', "missing_key", 0),
    ('{"recommendations": 3}', "not_a_list", 0),
    ('{"recommendations": "3, 1, 2"}', "not_a_list", 0),
    (numbers(["3", 1, 2]), "non_integer", 0),
    (numbers([3, 1.0, 2]), "non_integer", 1),
    ('{"recommendations": [3, 1, 2e0]}', "non_integer", 2),
    (numbers([3, True, 2]), "non_integer", 1),
    (numbers([3, None, 2]), "non_integer", 1),
    (numbers([[3], 1, 2]), "non_integer", 0),
    (numbers([C, A, B]), "non_integer", 0),  # SIDs where numbers are asked
    (numbers([0, 1, 2]), "foreign", 0),
    (numbers([3, -1, 2]), "foreign", 1),
    (numbers([3, 4, 2]), "foreign", 1),
    (numbers([3, 1, 2, 4]), "foreign", 3),
    (numbers([3, 1, 10 ** 30]), "foreign", 2),
    (numbers([3, 1, 1]), "duplicate", 2),
    (numbers([3, 1, 2, 2]), "duplicate", 3),
    (numbers([3, 1]), "missing", 2),
    (numbers([]), "missing", 0),
])
def test_positions_reason_codes_and_prefix(text, reason, prefix):
  r = positions(text)
  assert (r.omega, r.order, r.reason, r.prefix) == (False, None, reason, prefix)


def test_positions_empty_slate_and_explanation_on_failure():
  assert positions(numbers([]), []).reason == "empty_slate"
  assert positions(numbers([3, 3])).explanation == "because"
  assert positions(None).reason == "no_json"
  with pytest.raises(ValueError, match="answer_format"):
    parser.parse_ranking(numbers([1]), ["x"], "numbers")


def test_parse_batch_positions():
  texts = [numbers([3, 1, 2]), numbers([2, 2, 1]), numbers([C, A, B])]
  omega, order, reasons, prefix = parser.parse_batch(texts, [SLATE] * 3, "positions")
  np.testing.assert_array_equal(omega, [True, False, False])
  np.testing.assert_array_equal(order, [[2, 0, 1], [0, 1, 2], [0, 1, 2]])
  np.testing.assert_array_equal(prefix, [3, 1, 0])
  assert reasons == ["ok", "duplicate", "non_integer"]


def _check_positions(text):
  r = positions(text)
  assert r.reason in parser.REASONS
  assert r.omega == (r.reason == "ok")
  assert (sorted(r.order) == [0, 1, 2]) if r.omega else r.order is None
  return r


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=200))
def test_positions_never_raise_on_random_strings(text):
  _check_positions(text)


@settings(max_examples=500, deadline=None)
@given(st.permutations([1, 2, 3]), st.integers(0, 60),
       st.text(alphabet='{}[]",:.-+eE0123456789 \\', max_size=6))
def test_positions_never_raise_on_mutations(perm, pos, junk):
  text = numbers(list(perm))
  r = _check_positions(text)
  assert r.omega and [p + 1 for p in r.order] == list(perm)
  _check_positions(text[:pos] + junk + text[pos:])


def test_positions0_reads_numbers_from_zero():
  res = parser.parse_ranking(numbers([2, 0, 1]), SLATE, "positions0")
  assert (res.omega, res.order) == (True, (2, 0, 1))
  bad = parser.parse_ranking(numbers([3, 1, 2]), SLATE, "positions0")
  assert (bad.omega, bad.reason, bad.prefix) == (False, "foreign", 0)
