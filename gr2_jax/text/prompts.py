"""The re-ranking prompt: system turn, user turn (history and candidates), assistant JSON answer.

Items are dicts with a "sid" string and metadata ("title", "year", "genres"), written in the
unified item format of `gr2_jax.sids.tokens.format_item`. The answer is
`{"explanation": "...", "recommendations": [...]}`, or only the recommendations in the
no-reasoning variant. The recommendations are the candidates' SIDs (answer_format "sids", paper 1)
or the numbers 1..K the prompt shows beside the candidates (answer_format "positions", the
technical report), which need no copying and far fewer tokens.
"""

import dataclasses
import json

from gr2_jax.errors import UserError
from gr2_jax.sids import tokens

PART_ORDERS = ("system_user_candidates", "system_candidates_user")
ITEM_FIELDS = ("sid", "title", "year", "genres", "evidence")
# Every field but the per-slate "evidence" (`gr2_jax.teachers.evidence`), which needs statistics.
DEFAULT_ITEM_FIELDS = ("sid", "title", "year", "genres")
USER_FIELDS = ("age", "gender", "occupation")
ANSWER_FORMATS = ("sids", "positions", "positions0")
EVIDENCE_FORMATS = ("counts", "ranks")  # see `teachers.evidence`


def first_number(answer_format):
  """The number of the first candidate in a numbered answer format (None for "sids"):
  "positions" numbers the candidates 1..K, "positions0" 0..K-1 (one token each for K <= 10
  with digit-level tokenizers, so the answer's first token is the whole first choice)."""
  return {"positions": 1, "positions0": 0}.get(answer_format)


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """How a re-ranking prompt is rendered.

  part_order: "system_user_candidates", or "system_candidates_user" so that the system turn and
    the candidates form a prefix shared by every user who gets the same slate.
  reasoning: False renders the no-reasoning variant (the answer holds only the ranking).
  answer_head: (reasoning=False only) the assistant turn is opened with the answer's head, so
    the model's output is the list itself.
  answer_format: "sids" (the answer lists the candidates' SIDs), "positions" (the candidates
    are numbered 1..K and the answer lists the numbers, e.g. [3, 1, 2]) or "positions0" (the
    same numbered 0..K-1).
  """
  max_history: int = 20
  item_fields: tuple = DEFAULT_ITEM_FIELDS
  part_order: str = "system_user_candidates"
  reasoning: bool = True
  include_user: bool = True
  item_noun: str = "movies"
  answer_format: str = "sids"
  # Co-occurrence window (steps) of the training-period statistics behind the "evidence" field.
  evidence_window: int = 5
  # How the "evidence" field reads: "counts" (co-watched 37, followed last 4) or "ranks" within
  # the slate (co-watched #2, followed last #1); see `teachers.evidence`.
  evidence_format: str = "counts"
  # With reasoning=False: the assistant turn opens with the answer's head ({"recommendations":
  # [), so the model writes only the list (the reasoning bypassed, the serving setting).
  answer_head: bool = False
  # Numbered formats: each candidate line ends with its number again (`3. Title | ... -> 3`),
  # so the line's last token, where a reader of the line has gathered it, is the number the
  # answer copies (what `sft.route_weight` teaches the last layer's heads to look at).
  number_again: bool = False

  def __post_init__(self):
    if self.part_order not in PART_ORDERS:
      raise UserError(f"prompt part_order must be one of {', '.join(PART_ORDERS)}, "
                      f"got {self.part_order!r}")
    unknown = [f for f in self.item_fields if f not in ITEM_FIELDS]
    if unknown:
      raise UserError(f"unknown prompt item_fields {unknown}; valid: {', '.join(ITEM_FIELDS)}")
    if self.answer_format not in ANSWER_FORMATS:
      raise UserError(f"prompt answer_format must be one of {', '.join(ANSWER_FORMATS)}, "
                      f"got {self.answer_format!r}")
    if "sid" not in self.item_fields and (self.reasoning
                                          or first_number(self.answer_format) is None):
      raise UserError("prompt item_fields must include 'sid' unless the answer is numbered "
                      "(answer_format positions or positions0) without reasoning: the answer "
                      "and the reasoning cite items by SID")
    if self.evidence_format not in EVIDENCE_FORMATS:
      raise UserError(f"prompt evidence_format must be {' or '.join(EVIDENCE_FORMATS)}, "
                      f"got {self.evidence_format!r}")
    if self.evidence_window < 1:
      raise UserError(f"prompt evidence_window must be >= 1, got {self.evidence_window}")
    if self.answer_head and self.reasoning:
      raise UserError("prompt answer_head prefills the ranking's head, which skips the "
                      "reasoning: it needs reasoning=False")
    if self.number_again and first_number(self.answer_format) is None:
      raise UserError("prompt number_again repeats each candidate's number: it needs a "
                      f"numbered answer_format (positions, positions0), got {self.answer_format!r}")
    if self.max_history < 1:
      raise UserError(f"prompt max_history must be >= 1, got {self.max_history}")


def item_legend(cfg: PromptConfig) -> str:
  """How an item line reads under cfg's fields, e.g. `SID title (year) | genres`."""
  fields = cfg.item_fields
  head = " ".join(w for f, w in (("sid", "SID"), ("title", "title"), ("year", "(year)"))
                  if f in fields)
  return " | ".join([head] * bool(head) + [f for f in fields if f not in ("sid", "title", "year")])


def system_text(cfg: PromptConfig) -> str:
  """Analyst persona, the objective and the answer schema, in a few short lines."""
  lines = [
      f"You are a recommendation analyst. Rank the candidate {cfg.item_noun} by how likely the "
      "user watches each next, most likely first.",
      f"Items: {item_legend(cfg)}.",
  ]
  entry, each = (("number", "every candidate's number once")
                 if first_number(cfg.answer_format) is not None
                 else ("SID", "every candidate once"))
  if cfg.reasoning:
    lines += [
        "Explain in three steps citing SIDs: history patterns, matching candidates, choice.",
        f'Answer JSON only: {{"explanation": "...", "recommendations": [{entry}, ...]}}, {each}.',
    ]
  else:
    lines.append(f'Answer JSON only: {{"recommendations": [{entry}, ...]}}, {each}.')
  return "\n".join(lines)


def item_line(item, cfg: PromptConfig) -> str:
  fields = tuple(f for f in cfg.item_fields if f != "sid")
  return tokens.format_item(item, item["sid"] if "sid" in cfg.item_fields else "", fields)


def user_text(user) -> str:
  """`age 25, gender M, occupation 8`: the known user features (missing ones skipped)."""
  parts = []
  for k in USER_FIELDS:
    v = user.get(k)
    if v is None or v == "" or v == -1:
      continue
    parts.append(f"{k} {v}")
  return ", ".join(parts)


def _history_block(history_items, cfg):
  return ["History (oldest first):"] + [item_line(it, cfg)
                                        for it in shown_history(history_items, cfg)]


def history_text(history_items, cfg: PromptConfig) -> str:
  """The history block of the user turn as the prompt shows it."""
  return "\n".join(_history_block(history_items, cfg))


def _candidates_block(slate_items, cfg):
  lines = [item_line(it, cfg) for it in slate_items]
  first = first_number(cfg.answer_format)
  if first is not None:
    again = cfg.number_again
    lines = [f"{i}. {line}" + (f" -> {i}" if again else "") for i, line in enumerate(lines, first)]
  return [f"Candidates ({len(slate_items)}):"] + lines


def shown_history(history_items, cfg: PromptConfig):
  """The history items the prompt shows (the most recent `max_history`)."""
  return list(history_items)[-cfg.max_history:]


# The header of the block that shows the context compressor's summary in place of the history
# block ("History (oldest first):" + items); both headers count in the compression reward's
# tokens, so this one is as short as the history's own (9 and 10 tokens with the demo
# tokenizer; a 25-token header alone was 23% of the history block's 110).
SUMMARY_HEAD = "History (summary):"


def user_content(history_items, slate_items, cfg: PromptConfig, user=None, summary=None) -> str:
  """The user turn: user features, history (most recent last) and candidates in cfg's order.
  With `summary` (the context compressor's text) the summary stands in for the history."""
  context = []
  if cfg.include_user and user:
    u = user_text(user)
    if u:
      context.append(f"User: {u}")
  if summary is None:
    context += _history_block(history_items, cfg)
  else:
    context += [SUMMARY_HEAD, summary]
  candidates = _candidates_block(slate_items, cfg)
  if cfg.part_order == "system_candidates_user":
    return "\n".join(candidates + context)
  return "\n".join(context + candidates)


def recommendations(order, slate_sids, answer_format="sids"):
  """The answer's list for slate positions `order`: their SIDs, or their numbers 1..K."""
  first = first_number(answer_format)
  if first is not None:
    return [int(p) + first for p in order]
  return [slate_sids[int(p)] for p in order]


def render_answer(recs, explanation=None) -> str:
  """The assistant's JSON answer (`recs`: SIDs or numbers, see `recommendations`); without an
  explanation only the recommendations."""
  obj = {} if explanation is None else {"explanation": explanation}
  obj["recommendations"] = list(recs)
  return json.dumps(obj, ensure_ascii=False)


def build_messages(history_items, slate_items, cfg: PromptConfig, user=None, answer=None,
                   summary=None):
  """[system, user] messages, plus the assistant `answer` (a rendered JSON string) if given;
  `summary` replaces the history (see `user_content`)."""
  if not slate_items:
    raise UserError("a re-ranking prompt needs at least one candidate")
  messages = [{"role": "system", "content": system_text(cfg)},
              {"role": "user", "content": user_content(history_items, slate_items, cfg, user,
                                                       summary)}]
  if answer is not None:
    messages.append({"role": "assistant", "content": answer})
  return messages


def with_sids(item_ids, items, sids, evidence=None):
  """Item dicts of `item_ids` with their "sid" added; items[i] and sids[i] describe item i.

  evidence: optional {item id: text} (`gr2_jax.teachers.evidence`), added as the items'
  "evidence" field, which the prompt shows when its `item_fields` name it.
  """
  out = [dict(items[int(i)], sid=sids[int(i)]) for i in item_ids]
  if evidence:
    for it, i in zip(out, item_ids):
      if int(i) in evidence:
        it["evidence"] = evidence[int(i)]
  return out
