"""Internalize stage: a second RL pass from the RL model with the reasoning bypassed.

The prompt is the RL model's own in its no-reasoning variant with `answer_head`: the assistant
turn opens with `{"recommendations": [`, so the policy writes only the ranking; rollouts sample
the list under the strict list constraint (`rl.rollout`), rewards, advantages and guards are the
RL stage's (`rl.loop.train_policy`). Artifact: the model laid out as an rl artifact whose
`prompt.json` is the reasoning-free prompt (what `python -m gr2_jax.serve` serves), `train/`,
`table.json` / `table.md` (baselines; the RL model with its reasoning; the RL model with the
reasoning bypassed, before this pass; after it; with decode seconds and answer tokens per
model), `report.json`.
"""

import dataclasses
import os
import time

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp

from gr2_jax.errors import UserError
from gr2_jax.parallel import runtime as runtime_lib
from gr2_jax.rerank import evaluate as rerank_lib
from gr2_jax.rl import loop

REASONING, BEFORE, AFTER = "rl (reasoning)", "rl (reasoning-free)", "internalized"


def run(ctx):
  return runtime_lib.run_stage(ctx, _run)


def _run(ctx, rt):
  c = ctx.section
  loop.check_config(c)
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
  model, train_report = loop.train_policy(ctx, c, "train", model, tok, data, sids, free_cfg, rt)
  rt.save(ctx.out_dir, model, tok)
  ctx.write_json(rerank_lib.PROMPT_FILE, dataclasses.asdict(free_cfg))
  ctx.copy_in(os.path.join(rl_dir, rerank_lib.SID_TABLE_FILE))
  report = {"rl": rl_dir}
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
              BEFORE: (start, free_cfg), AFTER: (model, free_cfg)}
    rows = [(AFTER, REASONING), (AFTER, BEFORE)]
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


def per_slate_markdown(result):
  """Decode time (both decoding modes together, greedy, at the table's batch) and answer tokens
  per slate of each model."""
  lines = ["| model | decode ms per slate (free + constrained passes) | mean answer tokens "
           "(free / constrained) |", "|---|---|---|"]
  for name, x in result["per_slate"].items():
    toks = " / ".join(f"{v:.1f}" for v in x["answer_tokens"].values() if v is not None)
    lines.append(f"| {name} | {x['decode_ms_per_slate']:.1f} | {toks} |")
  return "\n".join(lines)
