"""Trace stage: a teacher writes explained re-rankings of training slates.

Targeted sampling shows the teacher the target, which it puts first and explains (one pass).
Rejection sampling hides it and samples up to `max_tries` times until the acceptance rule holds
("top1": the first item is the target; "positives_first": every positive precedes every
negative), else the example is dropped. Every teacher answer is checked with Omega against the
slate: an unparseable one counts as an invalid attempt, never as a trace.

Artifact: `traces_<mode>.jsonl` (one accepted trace a line: the conversation and its
provenance), `prompt.json` (the prompt config the conversations were rendered with),
`report.json` / `report.md` (teacher vs legacy on validation, acceptance statistics).
"""

import collections
import dataclasses
import json
import os
import time

from absl import logging
import numpy as np

from gr2_jax.data import artifacts
from gr2_jax.data import slates as slates_lib
from gr2_jax.errors import UserError
from gr2_jax.eval import tables
from gr2_jax.models import artifact
from gr2_jax.rerank import evaluate as rerank_lib
from gr2_jax.rerank import teacher as teacher_lib
from gr2_jax.sids import tokens as sid_lib
from gr2_jax.teachers import base
from gr2_jax.teachers import cf
from gr2_jax.teachers import cf_stats
from gr2_jax.teachers import evidence as evidence_lib
from gr2_jax.text import parser
from gr2_jax.text import prompts
from gr2_jax.text import tokenizers

MODES = ("targeted", "rejection")
ACCEPTANCE = ("top1", "positives_first", "any")
DROP_REASONS = ("empty_slate", "target_not_in_slate", "invalid_output", "not_accepted")


def prompt_config(section):
  """PromptConfig of a config's `prompt` section (or a plain dict of its fields)."""
  d = dict(section)
  d["item_fields"] = tuple(d.get("item_fields", prompts.DEFAULT_ITEM_FIELDS))
  return prompts.PromptConfig(**d)


def accepted(order, target_pos, labels, rule):
  """Whether an output order (slate positions) passes the acceptance rule ("any": every valid
  order, so the traces are the teacher's own orders, its greedy ones at temperature 0)."""
  if rule == "any":
    return True
  if rule == "top1":
    return order[0] == target_pos
  lab = np.asarray(labels)[list(order)] > 0
  # Every positive precedes every negative: no positive after the first negative.
  first_neg = np.argmin(lab) if not lab.all() else len(lab)
  return not lab[first_neg:].any()


def _seed(seed, example_id, mode):
  return [int(seed), int(example_id), MODES.index(mode)]


def generate(teacher, examples, labels, example_ids, sids, mode, *, max_tries=8,
             acceptance="top1", seed=0, answer_format="sids"):
  """(records, stats) of one sampling mode over TeacherExamples, whose answers are parsed in
  `answer_format`.

  records: accepted (example index, TeacherOutput, attempt, seed); stats: counters of drops
  by reason, attempts of accepted examples and invalid teacher answers.
  """
  if mode not in MODES:
    raise UserError(f"unknown trace mode {mode!r}; valid: {', '.join(MODES)}")
  if acceptance not in ACCEPTANCE:
    raise UserError(f"unknown acceptance rule {acceptance!r}; valid: {', '.join(ACCEPTANCE)}")
  if max_tries < 1:
    raise UserError(f"max_tries must be >= 1, got {max_tries}")
  records = []
  dropped = collections.Counter()
  attempts = collections.Counter()
  invalid = collections.Counter()
  for i, ex in enumerate(examples):
    if not len(ex.slate):
      dropped["empty_slate"] += 1
      continue
    if ex.target not in ex.slate:
      dropped["target_not_in_slate"] += 1
      continue
    slate_sids = [sids[int(x)] for x in ex.slate]
    target_pos = list(ex.slate).index(ex.target)
    s = _seed(seed, example_ids[i], mode)
    rng = np.random.default_rng(s)
    tries = 1 if mode == "targeted" else max_tries
    kept, any_valid = None, False
    for attempt in range(1, tries + 1):
      out = teacher.sample(ex, target_visible=mode == "targeted", rng=rng)[0]
      parsed = parser.parse_ranking(out.text, slate_sids, answer_format)
      if not parsed.omega:
        invalid[parsed.reason] += 1
        continue
      any_valid = True
      ok = (parsed.order[0] == target_pos if mode == "targeted"
            else accepted(parsed.order, target_pos, labels[i], acceptance))
      if ok:
        kept = (i, out, attempt, s)
        break
    if kept is None:
      dropped["not_accepted" if any_valid else "invalid_output"] += 1
      continue
    attempts[kept[2]] += 1
    records.append(kept)
  return records, {"dropped": {r: dropped[r] for r in DROP_REASONS},
                   "attempts": dict(sorted(attempts.items())),
                   "invalid_answers": dict(invalid)}


def summarize(n, records, stats, max_tries, trace_tokens):
  """Acceptance rate, attempts histogram, dropped share and trace length statistics."""
  accepted_n = len(records)
  hist = [stats["attempts"].get(a, 0) for a in range(1, max_tries + 1)]
  lengths = np.asarray(trace_tokens, np.float64)
  return {
      "examples": n, "accepted": accepted_n,
      "acceptance_rate": accepted_n / n if n else 0.0,
      "dropped_share": 1 - accepted_n / n if n else 0.0,
      "dropped": stats["dropped"],
      "attempts_hist": hist,
      "mean_attempts": float(np.dot(np.arange(1, max_tries + 1), hist) / max(accepted_n, 1)),
      "invalid_answers": stats["invalid_answers"],
      "trace_length": {
          "mean": float(lengths.mean()) if lengths.size else 0.0,
          "p50": float(np.percentile(lengths, 50)) if lengths.size else 0.0,
          "p95": float(np.percentile(lengths, 95)) if lengths.size else 0.0,
          "max": float(lengths.max()) if lengths.size else 0.0,
      },
  }


def _explanation_length(text, slate_sids, tok, answer_format):
  """Length of the answer's explanation in tokens of `tok`, or in words without one."""
  explanation = parser.parse_ranking(text, slate_sids, answer_format).explanation or ""
  return len(tok.encode(explanation)) if tok is not None else len(explanation.split())


def shuffle_display(examples, labels, seed):
  """Each example's slate shown in a seeded random order, its labels following.

  Returns (examples, labels [N, K], display [N, K]): display[i, j] is the legacy position of
  the j-th shown candidate. The CF teacher ranks by content (its position weight is 0), so its
  orders do not change; what changes is that the answer's first number no longer tends to be 1
  (SASRec's top slot holds the target most often), so a student cannot learn to copy the shown
  order.
  """
  rng = np.random.default_rng([int(seed), 0x5D15])
  labels = np.asarray(labels)
  display = np.stack([rng.permutation(len(ex.slate)) for ex in examples])
  shown = [dataclasses.replace(ex, slate=tuple(ex.slate[j] for j in p))
           for ex, p in zip(examples, display)]
  return shown, np.take_along_axis(labels, display, axis=1), display


def make_teacher(c, data_dir, items, sids, prompt_cfg):
  if c.teacher == "checkpoint":
    if not c.teacher_checkpoint or not os.path.isdir(c.teacher_checkpoint):
      raise UserError(f"traces.teacher_checkpoint {c.teacher_checkpoint!r} is not a folder; "
                      "point it at an sft or midtrain artifact")
    model, tok = artifact.load_model_and_tokenizer(c.teacher_checkpoint)
    return teacher_lib.CheckpointTeacher(model, tok, items, sids, prompt_cfg,
                                         temperature=c.teacher_temperature,
                                         max_new_tokens=c.teacher_max_new_tokens)
  if c.teacher != "cf":
    raise UserError(f"unknown teacher {c.teacher!r}; valid: cf, checkpoint")
  return cf.CFTeacher(cf_stats.load_stats(data_dir, c.cf_window), items, sids, config=c.cf,
                      prompt_cfg=prompt_cfg)


def _markdown(report):
  lines = [f"Teacher {report['teacher']} vs legacy order on "
           f"{report['teacher_eval']['slates']} validation slates:", "",
           report["teacher_eval"]["table"], "",
           "| mode | examples | accepted | acceptance | dropped | mean attempts | attempts "
           f"histogram (1..N) | trace length ({report['length_unit']}) mean / p95 |",
           "|---|---|---|---|---|---|---|---|"]
  for mode, m in report["modes"].items():
    lines.append(f"| {mode} | {m['examples']} | {m['accepted']} | {m['acceptance_rate']:.3f} | "
                 f"{m['dropped_share']:.3f} | {m['mean_attempts']:.2f} | "
                 f"{' '.join(map(str, m['attempts_hist']))} | "
                 f"{m['trace_length']['mean']:.1f} / {m['trace_length']['p95']:.0f} |")
  return "\n".join(lines)


def run(ctx):
  c = ctx.section
  t_start = time.time()
  data_dir, legacy_dir = ctx.inputs["data"], ctx.inputs["legacy"]
  items = artifacts.load_items(data_dir)
  users = artifacts.load_users(data_dir)
  table = sid_lib.load_sid_table(ctx.inputs["sids"])
  if len(table["items"]) != len(items):
    raise UserError(f"the SID table has {len(table['items'])} items but the data artifact "
                    f"{len(items)}; rerun the sids stage on this data")
  if c.split not in slates_lib.SPLITS.values():
    raise UserError(f"traces.split must be one of {', '.join(slates_lib.SPLITS.values())}, "
                    f"got {c.split!r}")
  unknown = [m for m in c.modes if m not in MODES]
  if unknown or not c.modes:
    raise UserError(f"traces.modes must name some of {', '.join(MODES)}, got {tuple(c.modes)}")
  sids = [row["sid"] for row in table["items"]]
  prompt_cfg = prompt_config(c.prompt)
  teacher = make_teacher(c, data_dir, items, sids, prompt_cfg)
  evidence = evidence_lib.for_prompt(prompt_cfg, data_dir)
  tok = tokenizers.load_tokenizer(c.tokenizer) if c.tokenizer else None

  val = slates_lib.load_split(legacy_dir, "validation", max_examples=c.teacher_eval_examples,
                              seed=c.seed)
  if not len(val.get("slate", ())):
    raise UserError(f"no validation slates in {legacy_dir}; use more data")
  if c.teacher == "cf":
    rows, table_md = cf.evaluate_teacher(teacher, val, n_boot=c.n_boot, seed=c.seed)
  else:
    orders, _, _ = rerank_lib.evaluate_checkpoint(
        teacher.model, teacher.tok, "teacher", val, items, sids, prompt_cfg, users,
        max_new_tokens=c.teacher_max_new_tokens, constrained=(False,), evidence=evidence)
    n, k = val["slate"].shape
    rows = tables.evaluate(dict({"legacy": np.tile(np.arange(k), (n, 1))}, **orders), val,
                           n_boot=c.n_boot, seed=c.seed)
    table_md = tables.format_table(rows)
  report = {"teacher": c.teacher, "length_unit": "tokens" if tok is not None else "words",
            "teacher_eval": {"slates": int(len(val["slate"])), "rows": rows, "table": table_md},
            "modes": {}}
  logging.info("[traces] teacher vs legacy on validation:\n%s", table_md)

  slates = slates_lib.load_split(legacy_dir, c.split, max_examples=c.max_examples, seed=c.seed)
  if not len(slates.get("slate", ())):
    raise UserError(f"no {c.split} slates in {legacy_dir}; use more data")
  examples = base.examples_from_slates(slates, users, evidence)
  labels, display = slates["labels"], None
  if c.shuffle_display:
    examples, labels, display = shuffle_display(examples, labels, c.seed)
  for mode in c.modes:
    t0 = time.time()
    records, stats = generate(teacher, examples, labels, slates["example_id"], sids,
                              mode, max_tries=c.max_tries, acceptance=c.acceptance, seed=c.seed,
                              answer_format=prompt_cfg.answer_format)
    lengths = []
    with open(ctx.path(f"traces_{mode}.jsonl"), "w") as f:
      for i, out, attempt, seed in records:
        ex = examples[i]
        lengths.append(_explanation_length(out.text, [sids[x] for x in ex.slate], tok,
                                           prompt_cfg.answer_format))
        f.write(json.dumps({
            "example_id": int(slates["example_id"][i]), "user": int(slates["user"][i]),
            "slate": list(ex.slate), "target_index": list(ex.slate).index(ex.target),
            **({} if display is None else {"display": [int(j) for j in display[i]]}),
            "order": list(out.order),
            "teacher": c.teacher, "mode": mode, "attempt": attempt, "seed": seed,
            "messages": base.conversation(ex, out, items, sids, prompt_cfg),
        }, ensure_ascii=False) + "\n")
    m = summarize(len(examples), records, stats, 1 if mode == "targeted" else c.max_tries,
                  lengths)
    m["seconds"] = round(time.time() - t0, 1)
    report["modes"][mode] = m
    logging.info("[traces] %s: %d of %d accepted (%.3f), attempts %s, %.1fs", mode,
                 m["accepted"], m["examples"], m["acceptance_rate"], m["attempts_hist"],
                 m["seconds"])
  with open(ctx.path("prompt.json"), "w") as f:
    json.dump({k: list(v) if isinstance(v, tuple) else v
               for k, v in dict(c.prompt).items()}, f, indent=2)
  report["wall_seconds"] = round(time.time() - t_start, 1)
  with open(ctx.path("report.json"), "w") as f:
    json.dump(report, f, indent=2)
  text = _markdown(report)
  with open(ctx.path("report.md"), "w") as f:
    f.write(text + "\n")
  print(text)
  return {
      "teacher_R@1": rows["cf_teacher" if c.teacher == "cf" else "teacher"]["R@1"]["mean"],
      "legacy_R@1": rows["legacy"]["R@1"]["mean"],
      "modes": {mode: {k: m[k] for k in ("examples", "accepted", "acceptance_rate",
                                         "attempts_hist")}
                for mode, m in report["modes"].items()},
      "wall_seconds": report["wall_seconds"],
  }
