"""Omega: the strict parser and validator of a re-ranking answer.

Omega = 1 only when the answer's last top-level JSON object (after any text the model wrote
before it; only whitespace or chat end tokens may follow it) holds a "recommendations" list that
is a permutation of exactly the slate's SIDs (answer_format "sids"), or of the numbers 1..K the
prompt showed beside the K candidates (answer_format "positions": JSON integers only). Nothing is
ever partially parsed, and no input string makes the parser raise.
"""

import json
import re
from typing import NamedTuple, Optional

import numpy as np

from gr2_jax.sids import tokens
from gr2_jax.text import prompts

# bad_sid: an entry that is not one well-formed SID; non_integer: not a JSON integer (positions);
# foreign: not a slate item, or a number outside 1..K.
REASONS = ("ok", "no_json", "bad_json", "missing_key", "not_a_list", "bad_sid", "foreign",
           "duplicate", "missing", "empty_slate", "non_integer")
END_TOKENS = ("<|im_end|>", "<|endoftext|>")
_DECODER = json.JSONDecoder()


class ParseResult(NamedTuple):
  omega: bool
  order: Optional[tuple]  # slate positions in output order; None unless omega
  reason: str
  explanation: Optional[str]
  # Leading recommendations that are distinct slate items before the first fault (K where
  # omega): how far an invalid answer got.
  prefix: int = 0


def _fail(reason, explanation=None, prefix=0):
  return ParseResult(False, None, reason, explanation, prefix)


def _strip_tail(text):
  """Drops trailing whitespace and chat end tokens."""
  while True:
    text = text.rstrip()
    tok = next((t for t in END_TOKENS if text.endswith(t)), None)
    if tok is None:
      return text
    text = text[:-len(tok)]


def _last_object(text):
  """The outermost JSON object that ends where the text ends, or a failure reason."""
  starts = [m.start() for m in re.finditer(r"\{", text)]
  if not starts:
    return None, "no_json"
  for s in starts:  # the earliest start that decodes to the end is the outermost object
    try:
      obj, end = _DECODER.raw_decode(text, s)
    except (ValueError, RecursionError):
      continue
    if end == len(text):
      return obj, "ok"
  return None, "bad_json"


def canonical_sid(s):
  """The SID string if `s` is exactly one well-formed SID (surrounding spaces allowed)."""
  if not isinstance(s, str):
    return None
  s = s.strip()
  codes = tokens.parse_sid(s)
  if codes is None or not codes or tokens.sid_tokens(codes) != s:
    return None
  return s


def _sid_order(recs, slate_sids):
  """(slate positions of the leading valid entries, failure reason or None) for SIDs."""
  free = {}  # SID -> its unused slate positions, in slate order
  for pos, sid in enumerate(slate_sids):
    free.setdefault(str(sid).strip(), []).append(pos)
  order = []
  for r in recs:
    sid = canonical_sid(r)
    if sid is None:
      return order, "bad_sid"
    if sid not in free:
      return order, "foreign"
    if not free[sid]:
      return order, "duplicate"
    order.append(free[sid].pop(0))
  return order, None


def _number_order(recs, k, first=1):
  """(slate positions of the leading valid entries, failure reason or None) for numbers
  first..first + k - 1."""
  order = []
  for r in recs:
    if isinstance(r, bool) or not isinstance(r, int):  # JSON true is a Python int
      return order, "non_integer"
    if not first <= r < first + k:
      return order, "foreign"
    if r - first in order:
      return order, "duplicate"
    order.append(r - first)
  return order, None


def parse_ranking(text, slate_sids, answer_format="sids") -> ParseResult:
  """Parses and validates an answer against the slate shown (its SIDs, in shown order).

  answer_format "sids": a slate may hold two items with the same SID; the answer must then list
  that SID as often, and its occurrences take the slate positions in slate order.
  "positions": the entries are the numbers 1..K of the shown candidates (K = len(slate_sids));
  number n is slate position n - 1.
  """
  if answer_format not in prompts.ANSWER_FORMATS:
    raise ValueError(f"unknown answer_format {answer_format!r}")
  if not slate_sids:
    return _fail("empty_slate")
  if not isinstance(text, str):
    return _fail("no_json")
  obj, reason = _last_object(_strip_tail(text))
  if obj is None:
    return _fail(reason)
  explanation = obj.get("explanation")
  explanation = explanation if isinstance(explanation, str) else None
  if "recommendations" not in obj:
    return _fail("missing_key", explanation)
  recs = obj["recommendations"]
  if not isinstance(recs, list):
    return _fail("not_a_list", explanation)
  first = prompts.first_number(answer_format)
  if first is not None:
    order, fault = _number_order(recs, len(slate_sids), first)
  else:
    order, fault = _sid_order(recs, slate_sids)
  if fault is not None:
    return _fail(fault, explanation, len(order))
  if len(order) != len(slate_sids):
    return _fail("missing", explanation, len(order))
  return ParseResult(True, tuple(order), "ok", explanation, len(order))


def parse_batch(texts, slates_sids, answer_format="sids"):
  """Omega bool [N], order int32 [N, K] (identity where Omega = 0), reason codes [N] and
  valid prefix lengths int32 [N] (`ParseResult.prefix`).

  All slates must have the same size K; `answer_format` as in `parse_ranking`.
  """
  n = len(texts)
  if len(slates_sids) != n:
    raise ValueError(f"{n} texts but {len(slates_sids)} slates")
  sizes = {len(s) for s in slates_sids}
  if len(sizes) > 1:
    raise ValueError(f"slates differ in size: {sorted(sizes)}")
  k = sizes.pop() if sizes else 0
  omega = np.zeros(n, bool)
  order = np.tile(np.arange(k, dtype=np.int32), (n, 1))
  reasons = []
  prefix = np.zeros(n, np.int32)
  for i, (text, sids) in enumerate(zip(texts, slates_sids)):
    r = parse_ranking(text, sids, answer_format)
    reasons.append(r.reason)
    prefix[i] = r.prefix
    if r.omega:
      omega[i] = True
      order[i] = r.order
  return omega, order, reasons, prefix
