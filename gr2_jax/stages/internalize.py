"""Internalize stage: a second RL pass from the RL model with the reasoning bypassed.

The prompt is the RL model's own in its no-reasoning variant with `answer_head`: the assistant
turn opens with `{"recommendations": [`, so the policy writes only the ranking; rollouts sample
the list under the strict list constraint (`rl.rollout`), rewards, advantages and guards are the
RL stage's (`rl.loop.train_policy`).

Before the pass (`distill_examples` > 0), the reasoning model's own rankings are distilled into
the reasoning-free prompt: it re-ranks `distill_examples` training slates with its reasoning
(greedy, slate constraint on), and `distill_steps` SFT steps teach the same model, prompted
without reasoning, to answer those rankings directly (loss on the list only).

Artifact: the model laid out as an rl artifact whose `prompt.json` is the reasoning-free prompt
(what `python -m gr2_jax.serve` serves), `distill/` (the distillation's checkpoints),
`distill_targets.npz` (its targets, which a resumed run reads instead of decoding them again),
`train/`, `table.json` / `table.md` (baselines; the RL model with its reasoning; the RL model
with the reasoning bypassed, before this stage; after the distillation; after the pass; with
decode seconds and answer tokens per model), `report.json`.
"""

import dataclasses
import json
import os
import time

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from gr2_jax.errors import UserError
from gr2_jax.parallel import runtime as runtime_lib
from gr2_jax.rerank import evaluate as rerank_lib
from gr2_jax.rl import loop
from gr2_jax.teachers import base as teachers_base
from gr2_jax.text import prompts
from gr2_jax.train import trainer as trainer_lib

TARGETS_FILE = "distill_targets.npz"
REASONING, BEFORE, DISTILLED, AFTER = ("rl (reasoning)", "rl (reasoning-free)", "distilled",
                                       "internalized")


def run(ctx):
  return runtime_lib.run_stage(ctx, _run)


def _run(ctx, rt):
  c = ctx.section
  loop.check_config(c)
  if c.distill_examples < 0 or (c.distill_examples and (c.distill_steps < 1 or
                                                         c.distill_batch < 1)):
    raise UserError("internalize: distill_examples must be >= 0 (0 = no distillation), and "
                    "with it distill_steps and distill_batch >= 1")
  t_start = time.time()
  rl_dir = ctx.inputs["rl"]
  prompt_cfg, sids = rerank_lib.load_rerank_info(rl_dir)
  if not prompt_cfg.reasoning:
    raise UserError(f"{rl_dir} was trained without reasoning: there is nothing to internalize")
  free_cfg = dataclasses.replace(prompt_cfg, reasoning=False, answer_head=True)
  data = loop.load_data(ctx, c, free_cfg)
  model, tok = rt.load(rl_dir)
  # The list with its separators must fit the response budget, or every rollout is cut.
  first = data["train"]["slate"][0]
  _, need = rerank_lib.list_ranking_constraint(
      tok, model.cfg.vocab_size, [[sids[int(i)] for i in first]], free_cfg.answer_format, 1)
  if need > c.max_new_tokens:
    raise UserError(f"internalize.max_new_tokens={c.max_new_tokens} is below the {need} tokens "
                    "of a ranking with its separators; raise it")
  # The RL model as it starts, for the table (a copy: training donates the model's buffers).
  graphdef, state = nnx.split(model)
  start = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
  distilled, distill_report = None, None
  if c.distill_examples:
    tuned, distill_report = distill(ctx, c, rt, start, tok, data, sids, prompt_cfg, free_cfg)
    if tuned is not None:
      model = tuned
      graphdef, state = nnx.split(model)
      distilled = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
  model, train_report = loop.train_policy(ctx, c, "train", model, tok, data, sids, free_cfg, rt)
  rt.save(ctx.out_dir, model, tok)
  ctx.write_json(rerank_lib.PROMPT_FILE, dataclasses.asdict(free_cfg))
  ctx.copy_in(os.path.join(rl_dir, rerank_lib.SID_TABLE_FILE))
  report = {"rl": rl_dir, "distill": distill_report}
  report.update({k: train_report[k] for k in (
      "iterations", "resumed_from", "skipped_updates", "algorithm", "reward",
      "rollout_tokens_per_sec", "iteration_seconds", "wall_seconds")})
  report["history"] = [{k: h.get(k) for k in ("iteration", "reward", "valid_rate",
                                              "response_length", "kendall_tau")}
                       for h in train_report["history"]]
  if c.eval_examples:
    t0 = time.time()
    # The reasoning model decodes with the RL stage's budget (its answers hold the reasoning).
    models = {REASONING: (start, prompt_cfg, ctx.config.rl.max_new_tokens),
              BEFORE: (start, free_cfg)}
    rows = [(AFTER, REASONING), (AFTER, BEFORE)]
    if distilled is not None:
      models[DISTILLED] = (distilled, free_cfg)
      rows += [(DISTILLED, REASONING), (AFTER, DISTILLED)]
    models[AFTER] = (model, free_cfg)
    pairs = [(rerank_lib.row_name(a, cons), rerank_lib.row_name(b, cons))
             for cons in c.eval_constrained for a, b in rows]
    result, md = loop.final_table(ctx, c, models, tok, data, sids, prompt_cfg, pairs)
    n = result["slates"]
    diags = result["diagnostics"]
    result["per_slate"] = {
        name: {"decode_ms_per_slate": 1000.0 * secs / n,
               "answer_tokens": {row: d.get("mean_response_length")
                                 for row, d in diags.items() if row.startswith(name)}}
        for name, secs in result["seconds"].items()}
    md += "\n\n" + per_slate_markdown(result)
    loop.write_table(ctx, result, md, "internalize")
    report["eval_seconds"] = round(time.time() - t0, 1)
    report["table"] = {r: {"R@1": x["R@1"]["mean"], "R@1_lift": x.get("lift", {}).get("R@1")}
                       for r, x in result["rows"].items()}
    report["valid_rate"] = {r: d["valid_rate"] for r, d in diags.items()}
    report["per_slate"] = result["per_slate"]
    report["paired"] = result["paired"]
  report["wall_seconds"] = round(time.time() - t_start, 1)
  ctx.write_json("report.json", report)
  logging.info("[internalize] done in %.1f s", report["wall_seconds"])
  return {k: report[k] for k in ("iterations", "wall_seconds") if k in report}


def distill_examples(model, tok, slates, data, sids, prompt_cfg, free_cfg, *, max_new_tokens,
                     batch_size):
  """(examples, report): the reasoning model's greedy rankings (slate constraint on) of stacked
  slate records, as (ids, loss weights) of the reasoning-free prompt (its head prefilled)
  answered by the same ranking; the weights cover the list after the head and the stop token.
  A slate whose reasoning answer was not valid is left out (counted)."""
  examples = teachers_base.examples_from_slates(slates, data["users"], data.get("evidence"))
  results = rerank_lib.rerank(model, tok, examples, data["items"], sids, prompt_cfg,
                              max_new_tokens=max_new_tokens, batch_size=batch_size,
                              constrained=(True,))
  res = results[True]
  p_ids = rerank_lib.prompt_ids(examples, data["items"], sids, free_cfg, tok)
  fmt = free_cfg.answer_format
  out, firsts = [], []
  for i, ex in enumerate(examples):
    if not res.omega[i]:
      continue
    shown = [sids[int(x)] for x in ex.slate]
    text = prompts.render_answer(prompts.recommendations(res.order[i], shown, fmt))
    ids = tok.encode(text)
    head = list(rerank_lib.head_ids(tok, fmt, shown[0]))
    if ids[:len(head)] != head:
      raise UserError("the tokenizer writes the answer's head with its first entry")
    target = ids[len(head):] + [tok.im_end_id]
    out.append((np.asarray(p_ids[i] + target, np.int32),
                np.asarray([0.0] * len(p_ids[i]) + [1.0] * len(target), np.float32)))
    firsts.append(int(res.order[i][0]))
  report = {"slates": len(examples), "examples": len(out),
            "invalid": int(len(examples) - len(out)),
            "first_is_shown_first": float(np.mean([f == 0 for f in firsts])) if firsts else None}
  return out, report


def distill(ctx, c, rt, model, tok, data, sids, prompt_cfg, free_cfg):
  """`distill_steps` SFT steps of a copy of `model` (the reasoning model) on its own rankings of
  `distill_examples` seeded training slates, prompted without reasoning; returns (model or None
  when no ranking was valid, report). Its checkpoints (`distill/`) resume."""
  t0 = time.time()
  train = data["train"]
  rng = np.random.default_rng([c.seed, 1])
  idx = np.sort(rng.choice(len(train["slate"]), min(c.distill_examples, len(train["slate"])),
                           replace=False))
  slates = {k: v[idx] for k, v in train.items()}
  cached = load_targets(ctx.path(TARGETS_FILE))
  if cached is not None:
    examples, report = cached
    logging.info("[internalize] distillation targets of %d slates read from %s (a run of this "
                 "artifact made them)", report["slates"], ctx.path(TARGETS_FILE))
  else:
    examples, report = distill_examples(
        model, tok, slates, data, sids, prompt_cfg, free_cfg,
        max_new_tokens=ctx.config.rl.max_new_tokens, batch_size=c.eval_batch)
    if jax.process_index() == 0:
      save_targets(ctx.path(TARGETS_FILE), examples, report)
  if not examples:
    logging.warning("[internalize] the reasoning model answered none of %d training slates "
                    "validly: no distillation, the pass starts from the RL model",
                    report["slates"])
    return None, report
  logging.info("[internalize] distilling the reasoning model's rankings of %d training slates "
               "(%d invalid, left out; the first shown item ranked first in %.0f%%)",
               report["examples"], report["invalid"], 100 * report["first_is_shown_first"])
  model, fit = fit_copy(model, examples, c, rt, ctx.path("distill"), tok.pad_id)
  report.update(fit, wall_seconds=round(time.time() - t0, 1))
  logging.info("[internalize] distillation: loss %s -> %s in %.1f s", report["first_loss"],
               report["final_loss"], report["wall_seconds"])
  return model, report


def save_targets(path, examples, report):
  """Writes the distillation targets (examples and their report) atomically: a resumed run
  reads them instead of decoding the training slates again."""
  lengths = np.asarray([len(ids) for ids, _ in examples], np.int64)
  ids = np.concatenate([e[0] for e in examples]) if examples else np.zeros(0, np.int32)
  weights = np.concatenate([e[1] for e in examples]) if examples else np.zeros(0, np.float32)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, ids=ids.astype(np.int32), weights=weights.astype(np.float32), lengths=lengths,
             report=np.asarray(json.dumps(report)))
  os.replace(tmp, path)


def load_targets(path):
  """(examples, report) that `save_targets` wrote, or None when there are none to read (a
  multi-process run always decodes them again: every process takes part in that decoding). A
  file that cannot be read is logged and ignored."""
  if jax.process_count() > 1 or not os.path.exists(path):
    return None
  try:
    with np.load(path) as z:
      ids, weights, lengths = z["ids"], z["weights"], z["lengths"]
      report = json.loads(str(z["report"]))
    if ids.shape != weights.shape or int(lengths.sum()) != ids.shape[0]:
      raise ValueError("its arrays do not agree in length")
  except (OSError, ValueError, KeyError) as e:
    logging.warning("[internalize] %s is unreadable (%s): the targets are made again", path, e)
    return None
  if not lengths.size:
    return [], report
  bounds = np.cumsum(lengths)[:-1]
  return list(zip(np.split(ids, bounds), np.split(weights, bounds))), report


def fit_copy(model, examples, c, rt, workdir, pad_id):
  """`trainer.fit_examples` of a copy of `model` (the reasoning model stays for the table) with
  the section's distill_* settings: (the copy trained, {steps, first_loss, final_loss})."""
  graphdef, state = nnx.split(model)
  copy = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
  copy, fit = trainer_lib.fit_examples(
      copy, examples, steps=c.distill_steps, batch_size=c.distill_batch,
      learning_rate=c.distill_lr, weight_decay=c.weight_decay, clip_norm=c.clip_norm,
      mesh=rt.mesh, rules=rt.rules, workdir=workdir, name="internalize/distill", pad_id=pad_id,
      seed=c.seed)
  return copy, {k: fit[k] for k in ("steps", "first_loss", "final_loss")}


def per_slate_markdown(result):
  """Decode time (both decoding modes together, greedy, at the table's batch) and answer tokens
  per slate of each model."""
  lines = ["| model | decode ms per slate (free + constrained passes) | mean answer tokens "
           "(free / constrained) |", "|---|---|---|"]
  for name, x in result["per_slate"].items():
    toks = " / ".join(f"{v:.1f}" for v in x["answer_tokens"].values() if v is not None)
    lines.append(f"| {name} | {x['decode_ms_per_slate']:.1f} | {toks} |")
  return "\n".join(lines)
