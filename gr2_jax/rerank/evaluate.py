"""Re-ranking of slates by a model checkpoint: greedy answers, Omega, legacy fallback.

Each slate's prompt is the chat of `gr2_jax.text.prompts` with an open assistant turn; the
model answers by greedy decoding with the sampler. The unconstrained answer is parsed with
Omega; an invalid one counts as the legacy order (and is counted). The constrained answer
restricts only the ranking (and runs only for slates whose free answer is invalid: a valid one
is its own constrained answer): decoding is free up to the answer's `"recommendations"` key (the
explanation may cite any item), and from there every SID must be one of the slate's items not
listed yet (`constraints.slate_constraint` triggered by `<|sid_begin|>`), or, in the "positions"
answer format, every token holding a digit must belong to a number 1..K not listed yet
(`constraints.group_constraint`; digit-free tokens stay free). Greedy decoding is
deterministic, so the free part is the unconstrained answer's prefix and is not decoded again.
"""

import dataclasses
import functools
import json
import os
import re

import jax
import numpy as np

from gr2_jax.errors import UserError
from gr2_jax.rl import diagnostics as diag_lib
from gr2_jax.sampling import constraints
from gr2_jax.sampling import sampler
from gr2_jax.sids import tokens as sid_lib
from gr2_jax.teachers import base
from gr2_jax.text import chat
from gr2_jax.text import parser
from gr2_jax.text import prompts

RANKING_KEY = '"recommendations"'
FORCED_PREFIX = '{"recommendations": ['
PROMPT_FILE = "prompt.json"
SID_TABLE_FILE = "sid_table.json"


@dataclasses.dataclass
class RerankResult:
  """Per slate: the answer text, Omega, the order used (legacy where invalid), reason code."""
  texts: list
  omega: np.ndarray  # bool [N]
  order: np.ndarray  # int32 [N, K]
  reasons: list
  lengths: np.ndarray  # int32 [N], generated tokens
  prefix: np.ndarray  # int32 [N], leading distinct slate items before the first fault
  forced: int = 0  # constrained answers that lacked the ranking key and got it forced


def prompt_ids(examples, items, sids, prompt_cfg, tok):
  """Chat ids (with the assistant turn opened) of TeacherExamples."""
  out = []
  for ex in examples:
    msgs = prompts.build_messages(prompts.with_sids(ex.history, items, sids),
                                  prompts.with_sids(ex.slate, items, sids, ex.evidence),
                                  prompt_cfg, user=ex.user, summary=ex.summary)
    ids = chat.encode_chat(msgs, tok, add_generation_prompt=True)
    if prompt_cfg.answer_head:
      ids += list(head_ids(tok, prompt_cfg.answer_format, sids[int(ex.slate[0])]))
    out.append(ids)
  return out


@functools.lru_cache(maxsize=64)
def head_ids(tok, answer_format, first_sid):
  """Ids of the answer up to its list's first entry (`{"recommendations": [`, with the opening
  quote in the SID format): what an `answer_head` prompt prefills. `first_sid`: the SID of the
  slate's first item (any SID: the head does not depend on it)."""
  first = prompts.first_number(answer_format)
  value = first_sid if first is None else str(first)
  text = prompts.render_answer(prompts.recommendations([0], [first_sid], answer_format))
  ids = tok.encode(text)
  ends = _token_ends(tok, ids, text)
  start = text.index(value, text.index("[") + 1)
  cut = next(j for j, e in enumerate(ends) if e > start)
  if cut == 0:
    raise UserError("the tokenizer writes the answer's head with its first entry")
  return tuple(ids[:cut])


def list_ranking_constraint(tok, vocab_size, shown_sids, answer_format, batch_size):
  """(make_constraint(start, real), token budget) of the strict reasoning-free list after the
  answer's head: each shown item exactly once, the closing and the stop token
  (`constraints.list_constraint` over `answer_ways`)."""
  rows = [_list_ways(tok, tuple(s), answer_format) for s in shown_sids]
  budget = max(sum(max(len(w) for w in going + close) for _, going, close in r) for r in rows)

  def make_constraint(s, real):
    part = rows[s:s + real]
    part += [part[-1]] * (batch_size - real)
    return constraints.list_constraint(part, vocab_size)

  return make_constraint, budget


@functools.lru_cache(maxsize=4096)
def _list_ways(tok, shown, answer_format):
  """`answer_ways(...)[1]` of a slate, kept: the rows of a batch that share their candidates,
  and slates shown again (served slates, rollouts of the same training slates), tokenize their
  answers once."""
  return answer_ways(tok, list(shown), answer_format, tok.im_end_id)[1]


# Prompt widths are padded to a multiple of this, so that the sampler (and the RL update, whose
# rows are prompt width + response budget) compile for a handful of shapes, not every batch.
PROMPT_MULTIPLE = 128


def generate(model, tok, prompts_ids, *, max_new_tokens, batch_size, make_constraint=None,
             greedy=True, temperature=1.0, key=None, jump_forward=0):
  """(responses, logps, finished, entropies) per prompt, in fixed-size batches (the last one
  padded with copies) so that every batch shares one compilation.

  A response keeps its stop token when it emitted one (`finished`); `logps` and `entropies` are
  the sampler's per-token log-probabilities and entropies of the distribution sampled from.
  `make_constraint(start, real)` builds a batch's constraint; with one, `jump_forward` > 1
  feeds the tokens it forces in chunks (`sampling.sampler`).
  """
  stops = chat.chat_stop_ids(tok)
  key = jax.random.key(0) if key is None else key
  responses, logps, finished, entropies = [], [], [], []
  for s in range(0, len(prompts_ids), batch_size):
    batch = list(prompts_ids[s:s + batch_size])
    real = len(batch)
    batch += [batch[-1]] * (batch_size - real)
    cons = make_constraint(s, real) if make_constraint is not None else None
    res = sampler.sample(model, batch, key=jax.random.fold_in(key, s),
                         max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature,
                         stop_tokens=stops, pad_id=tok.pad_id, constraint=cons,
                         prompt_multiple=PROMPT_MULTIPLE, vocab_limit=tok.vocab_size,
                         jump_forward=jump_forward if cons is not None else 0)
    toks, lps, ents = (np.asarray(x) for x in (res.tokens, res.logprobs, res.entropies))
    lens, done = np.asarray(res.lengths), np.asarray(res.done)
    for j in range(real):
      responses.append(toks[j, :lens[j]].tolist())
      logps.append(lps[j, :lens[j]])
      entropies.append(ents[j, :lens[j]])
      finished.append(bool(done[j]))
  return responses, logps, finished, entropies


def _greedy(model, tok, prompts_ids, *, max_new_tokens, batch_size, make_constraint=None):
  """Greedy generated ids per prompt, the stop token dropped."""
  out, _, finished, _ = generate(model, tok, prompts_ids, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, make_constraint=make_constraint)
  return [ids[:-1] if f and ids else ids for ids, f in zip(out, finished)]


def ranking_cut(tok, ids):
  """Smallest j such that decode(ids[:j]) contains the ranking key, or None."""
  if RANKING_KEY not in tok.decode(ids):
    return None
  lo, hi = 1, len(ids)
  while lo < hi:  # containment is monotone in j
    mid = (lo + hi) // 2
    if RANKING_KEY in tok.decode(ids[:mid]):
      hi = mid
    else:
      lo = mid + 1
  return lo


def sid_suffixes(tok, slate_sids):
  """Token ids of each slate SID after its `<|sid_begin|>` token."""
  begin = tok.token_to_id(sid_lib.SID_BEGIN)
  out = []
  for sid in slate_sids:
    ids = tok.encode(sid)
    if not ids or ids[0] != begin or len(ids) < 2:
      raise UserError(f"the tokenizer does not keep {sid_lib.SID_BEGIN} a single token in "
                      f"{sid!r}; use the tokenizer saved with the checkpoint")
    out.append(ids[1:])
  return out


_DIGIT = re.compile(r"[0-9]")


def _token_ends(tok, ids, text):
  """End offset in `text` of each token of `ids` (which encode `text`)."""
  parts = [tok.decode(ids[:j + 1]) for j in range(len(ids))]
  if not parts or parts[-1] != text or not all(text.startswith(p) for p in parts):
    raise UserError(f"the tokenizer does not decode {text!r} piece by piece; use "
                    "answer_format=sids")
  return [len(p) for p in parts]


@functools.lru_cache(maxsize=16)
def number_sequences(tok, k, first=1):
  """(going_on, closing): per number first..first + k - 1, the token sequences that write it in
  the answer's list followed by another number, and as the list's last.

  Each is the tokenizer's own ids of the number as it appears in a rendered answer (first, in
  the middle, last), closed by the token after it (the comma or bracket), unless the number's
  last token holds that already: "1" and "10" stay apart when digits are tokens.
  """
  going_on, closing = [set() for _ in range(k)], [set() for _ in range(k)]
  numbers = range(first, first + k)
  for n in numbers:
    others = [m for m in numbers if m != n]
    for recs in ([n] + others, others[:1] + [n] + others[1:], others + [n]):
      text = prompts.render_answer(recs)
      start = text.index("[") + 1
      for r in recs[:recs.index(n)]:
        start += len(str(r)) + 2  # the number and ", "
      end = start + len(str(n))
      ids = tok.encode(text)
      ends = _token_ends(tok, ids, text)
      first = next(j for j, e in enumerate(ends) if e > start)
      last = next(j for j, e in enumerate(ends) if e >= end)
      stop = min(last + 1 if ends[last] > end else last + 2, len(ids))  # closing token included
      lo = ends[first - 1] if first else 0
      rest = text[lo:start] + text[end:ends[stop - 1]]
      if ends[stop - 1] == end or _DIGIT.search(rest):
        raise UserError(f"the tokenizer writes number {n} of the answer's list together with "
                        "another number; use answer_format=sids")
      (closing if recs[-1] == n else going_on)[n - numbers[0]].add(tuple(ids[first:stop]))
  return tuple(tuple(tuple(sorted(w)) for w in ways) for ways in (going_on, closing))


@functools.lru_cache(maxsize=16)
def digit_free_ids(tok):
  """Ids of the tokens whose text holds no digit."""
  return tuple(i for i in range(tok.vocab_size) if not _DIGIT.search(tok.decode([i])))


def ranking_constraint(tok, vocab_size, shown_sids, answer_format, batch_size):
  """(make_constraint(start, real), token budget) of the constrained ranking of rows whose
  prompts showed the slates `shown_sids` (all of one size K)."""
  k = len(shown_sids[0])
  first = prompts.first_number(answer_format)
  if first is not None:
    going_on, closing = number_sequences(tok, k, first)
    cons = constraints.group_constraint(going_on, vocab_size, closing=closing,
                                        root_tokens=digit_free_ids(tok))
    # The numbers with their commas and brackets, spaces, the closing and the stop token.
    longest = [max(len(w) for w in a + b) for a, b in zip(going_on, closing)]
    return (lambda s, real: cons), sum(longest) + 2 * k + 8
  suffixes = [sid_suffixes(tok, s) for s in shown_sids]
  begin = tok.token_to_id(sid_lib.SID_BEGIN)

  def make_constraint(s, real):
    rows = suffixes[s:s + real]
    rows += [rows[-1]] * (batch_size - real)
    return constraints.slate_constraint(rows, vocab_size, trigger=begin)

  # The SIDs with their quotes and separators, and the closing.
  return make_constraint, sum(len(x) for x in suffixes[0]) + 4 * k + 8


def rerank(model, tok, examples, items, sids, prompt_cfg, *, max_new_tokens=448, batch_size=16,
           constrained=(False, True)):
  """{False: RerankResult unconstrained, True: constrained} for the requested modes."""
  if not examples:
    raise UserError("no slates to re-rank")
  slates_sids = [[sids[int(x)] for x in ex.slate] for ex in examples]
  fmt = prompt_cfg.answer_format
  p_ids = prompt_ids(examples, items, sids, prompt_cfg, tok)
  # An answer_head prompt prefilled the answer's head: the texts parsed start with it.
  lead = ([list(head_ids(tok, fmt, s[0])) for s in slates_sids] if prompt_cfg.answer_head
          else [[] for _ in slates_sids])
  free = _greedy(model, tok, p_ids, max_new_tokens=max_new_tokens, batch_size=batch_size)
  free_res = _parse([tok.decode(h + g) for h, g in zip(lead, free)], free, slates_sids, fmt)
  results = {}
  if False in constrained:
    results[False] = free_res
  if True in constrained:
    # A free answer that is already a valid ranking never meets the constraint's mask, so
    # greedy decoding under the constraint writes the same tokens: only the others are decoded
    # again.
    redo = [i for i in range(len(free)) if not free_res.omega[i]]
    gen, forced, heads = list(free), 0, []
    if prompt_cfg.answer_head and redo:
      # The list alone: decoded again from the head under the strict list constraint.
      make_constraint, budget = list_ranking_constraint(
          tok, model.cfg.vocab_size, [slates_sids[i] for i in redo], fmt, batch_size)
      tails = _greedy(model, tok, [p_ids[i] for i in redo], max_new_tokens=budget,
                      batch_size=batch_size, make_constraint=make_constraint)
      for i, t in zip(redo, tails):
        gen[i] = t
      redo = []
    for i in redo:
      cut = ranking_cut(tok, free[i])
      if cut is None:
        forced += 1
        heads.append(tok.encode(FORCED_PREFIX))
      else:
        heads.append(free[i][:cut])
    if redo:
      redo_sids = [slates_sids[i] for i in redo]
      make_constraint, tail_budget = ranking_constraint(tok, model.cfg.vocab_size, redo_sids,
                                                        fmt, batch_size)
      tails = _greedy(model, tok, [p_ids[i] + h for i, h in zip(redo, heads)],
                      max_new_tokens=tail_budget, batch_size=batch_size,
                      make_constraint=make_constraint)
      for i, h, t in zip(redo, heads, tails):
        gen[i] = h + t
    res = _parse([tok.decode(h + g) for h, g in zip(lead, gen)], gen, slates_sids, fmt)
    res.forced = forced
    results[True] = res
  return results


def _parse(texts, gen, slates_sids, answer_format):
  omega, order, reasons, prefix = parser.parse_batch(texts, slates_sids, answer_format)
  return RerankResult(texts=texts, omega=omega, order=order, reasons=reasons,
                      lengths=np.asarray([len(g) for g in gen], np.int32), prefix=prefix)


def diagnostics(result: RerankResult):
  """Valid rate, reason counts, valid prefix lengths, identity rate, Kendall tau and the top
  item's input position."""
  d = diag_lib.rerank_diagnostics(result.omega, result.order, lengths=result.lengths)
  d["top_input_position_hist"] = [int(x) for x in d["top_input_position_hist"]]
  d["reasons"] = {r: result.reasons.count(r) for r in parser.REASONS if r in result.reasons}
  d["invalid_as_legacy"] = int((~result.omega).sum())
  # How far answers got: counts of valid prefix lengths 0..K (K = valid), and their mean.
  k = result.order.shape[-1]
  d["valid_prefix_hist"] = [int(x) for x in np.bincount(result.prefix, minlength=k + 1)]
  d["mean_valid_prefix"] = float(result.prefix.mean())
  d["forced_ranking_key"] = int(result.forced)
  return d


def row_name(name, constrained):
  return f"{name} (constrained)" if constrained else name


def save_rerank_info(out_dir, prompt_fields, sid_table):
  """Writes what `load_rerank_info` needs next to a model checkpoint."""
  with open(os.path.join(out_dir, PROMPT_FILE), "w") as f:
    json.dump(prompt_fields, f, indent=2)
  with open(os.path.join(out_dir, SID_TABLE_FILE), "w") as f:
    json.dump(sid_table, f)


def load_rerank_info(checkpoint_dir):
  """(PromptConfig, SIDs in item-id order) saved with a re-ranking checkpoint."""
  path = os.path.join(checkpoint_dir, PROMPT_FILE)
  if not os.path.isfile(path):
    raise UserError(f"{checkpoint_dir} holds no {PROMPT_FILE}; point eval.checkpoints at an "
                    "sft artifact folder")
  with open(path) as f:
    fields = json.load(f)
  fields["item_fields"] = tuple(fields.get("item_fields", prompts.DEFAULT_ITEM_FIELDS))
  table = sid_lib.load_sid_table(os.path.join(checkpoint_dir, SID_TABLE_FILE))
  return prompts.PromptConfig(**fields), [row["sid"] for row in table["items"]]


def evaluate_checkpoint(model, tok, name, slates, items, sids, prompt_cfg, users=None, *,
                        max_new_tokens=448, batch_size=16, constrained=(False, True),
                        evidence=None, summaries=None):
  """Orders and diagnostics of one model on stacked slate records, per row name.

  evidence: the `teachers.evidence.SlateEvidence` of a prompt that shows the "evidence" field.
  summaries: one text per slate shown in place of its history (the context compressor's).
  Returns ({row name: order [N, K]}, {row name: diagnostics}, {row name: first answers}).
  """
  examples = base.examples_from_slates(slates, users, evidence, summaries)
  results = rerank(model, tok, examples, items, sids, prompt_cfg, max_new_tokens=max_new_tokens,
                   batch_size=batch_size, constrained=constrained)
  orders, diags, samples = {}, {}, {}
  for cons, res in results.items():
    row = row_name(name, cons)
    orders[row] = res.order
    diags[row] = diagnostics(res)
    samples[row] = res.texts[:3]
  return orders, diags, samples


def diagnostics_markdown(diags):
  """One line per row: valid rate, invalid reasons, valid prefix, identity rate, Kendall tau,
  top position, answer length."""
  lines = ["| ranker | valid-output rate | invalid (as legacy) | mean valid prefix (of K) | "
           "identity rate | Kendall tau | input position of the top item (0..K-1) | "
           "mean answer tokens |",
           "|---|---|---|---|---|---|---|---|"]
  for name, d in diags.items():
    reasons = ", ".join(f"{r} {n}" for r, n in d["reasons"].items() if r != "ok") or "-"
    lines.append(f"| {name} | {d['valid_rate']:.4f} | {d['invalid_as_legacy']} ({reasons}) | "
                 f"{d['mean_valid_prefix']:.2f} | "
                 f"{d['identity_rate']:.4f} | {d['kendall_tau']:.4f} | "
                 f"{' '.join(map(str, d['top_input_position_hist']))} | "
                 f"{d.get('mean_response_length', float('nan')):.1f} |")
  return "\n".join(lines)


def answer_ways(tok, shown, answer_format, stop_id):
  """(head ids, [(key, going_on, closing)] per candidate) of the strict reasoning-free answer
  `{"recommendations": [...]}` to a slate that showed the SIDs `shown`.

  The ways are the tokenizer's own ids of each entry as it appears in rendered answers (from
  the token holding the entry's first character up to the next entry's), the closing ones with
  the answer's end and `stop_id`; `head` is what precedes the first entry. Raises a UserError
  when the tokenizer writes an entry together with its neighbour.
  """
  k = len(shown)
  first = prompts.first_number(answer_format)
  values = [str(p + first) for p in range(k)] if first is not None else list(shown)
  head, going_on, closing = None, [set() for _ in range(k)], [set() for _ in range(k)]
  for last in range(k):
    order = [i for i in range(k) if i != last] + [last]
    text = prompts.render_answer(prompts.recommendations(order, shown, answer_format))
    ids = tok.encode(text)
    ends = _token_ends(tok, ids, text)
    starts, pos = [], text.index("[") + 1
    for i in order:  # the first character of each entry's value
      pos = text.index(values[i], pos)
      starts.append(pos)
      pos += len(values[i])
    cuts = [next(j for j, e in enumerate(ends) if e > s) for s in starts] + [len(ids)]
    for n, i in enumerate(order[:-1]):
      # The token holding an entry's first character may not reach back into the previous one.
      lo = ends[cuts[n] - 1] if cuts[n] else 0
      if n and lo < starts[n - 1] + len(values[order[n - 1]]):
        raise UserError("the tokenizer writes two entries of the answer's list together; use "
                        "another answer_format")
    if cuts[0] == 0 or (head is not None and tuple(ids[:cuts[0]]) != head):
      raise UserError("the tokenizer writes the answer's head with its first entry")
    head = tuple(ids[:cuts[0]])
    for n, i in enumerate(order):
      way = tuple(ids[cuts[n]:cuts[n + 1]])
      if n == k - 1:
        closing[i].add(way + (int(stop_id),))
      else:
        going_on[i].add(way)
  return list(head), [(shown[i] if first is None else i, tuple(sorted(going_on[i])),
                       tuple(sorted(closing[i]))) for i in range(k)]
