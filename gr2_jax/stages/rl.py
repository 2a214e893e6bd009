"""RL stage: the SFT model re-ranks training slates on device and learns from verifiable rewards.

One iteration: sample `rollout_prompts` training slates the reward can rank (a seeded function
of the iteration, so a resumed run draws the same ones), roll out `group_size` answers each
(slate shuffled per sample by default), parse, score in legacy positions with the configured
reward, then the algorithm (`gr2_jax.rl.algorithm`): overlong handling, group advantages, the
`train_groups` groups with reward variance out of the oversampled batch (DAPO dynamic sampling,
fixed shapes, filler masked out), update rows with the reference log-probs when the KL is on.
Then `ppo_epochs` passes of `minibatches` optimiser steps with importance ratios against the
rollout log-probabilities, both at the sampling temperature. A step without signal (every
rollout invalid, no group with variance) or with a non-finite loss or gradient is skipped
inside the jitted step, counted and logged.

Every iteration logs the reward and its components, valid-output rate, share of groups kept,
response length, entropy, identity rate, Kendall tau and the input position of the top item;
every `eval_every` iterations the greedy policy re-ranks `val_examples` validation slates.

The `ablation` preset trains one policy per variant (reward x slate order) with the same seed
and budget, and writes the order-copying diagnostics side by side.

Artifact: `model/`, `model_config.json`, `tokenizer/`, `prompt.json`, `sid_table.json` (an RL
checkpoint is evaluated like an SFT one), `train/` (checkpoints, metrics.jsonl, TensorBoard),
`table.json` / `table.md` (the final re-ranking table), `ablation.md` for the ablation, and
`report.json`.
"""

import os
import time

from absl import logging

from gr2_jax.errors import UserError
from gr2_jax.parallel import runtime as runtime_lib
from gr2_jax.rerank import evaluate as rerank_lib
from gr2_jax.rl import loop

def run(ctx):
  return runtime_lib.run_stage(ctx, _run)


def _run(ctx, rt):
  c = ctx.section
  loop.check_config(c)
  t_start = time.time()
  sft_dir = ctx.inputs["sft"]
  if c.init_from:  # e.g. an opd artifact: RL-OPD
    if not os.path.isfile(os.path.join(c.init_from, "model_config.json")):
      raise UserError(f"rl.init_from={c.init_from} holds no model (model_config.json); name a "
                      "finished sft, rl or opd artifact folder")
    sft_dir = c.init_from
  prompt_cfg, sids = rerank_lib.load_rerank_info(sft_dir)
  data = loop.load_data(ctx, c, prompt_cfg)
  if len(sids) != len(data["items"]):
    raise UserError(f"{sft_dir} was trained on a SID table of {len(sids)} items but the data has "
                    f"{len(data['items'])}")
  report = {"sft": sft_dir}
  if c.variants:
    reports = {}
    for v in c.variants:
      name, reward, order = (str(x) for x in v)
      if order not in ("shuffled", "fixed"):
        raise UserError(f"rl.variants slate order must be shuffled or fixed, got {order!r}")
      cv = c.copy_and_resolve_references()
      cv.reward = reward
      cv.shuffle = order == "shuffled"
      loop.check_config(cv)
      model, tok = rt.load(sft_dir)
      _, reports[name] = loop.train_policy(ctx, cv, name, model, tok, data, sids, prompt_cfg, rt)
    md = loop.ablation_markdown(reports)
    ctx.write_text("ablation.md", md + "\n")
    ctx.write_json("ablation.json", reports)
    logging.info("[rl] ablation:\n%s", md)
    print(md)
    report["ablation"] = {k: {x: r[x] for x in ("reward", "shuffle", "wall_seconds")}
                          for k, r in reports.items()}
  else:
    sft_model, tok = rt.load(sft_dir)
    model, tok = rt.load(sft_dir)
    model, train_report = loop.train_policy(ctx, c, "train", model, tok, data, sids, prompt_cfg,
                                            rt)
    rt.save(ctx.out_dir, model, tok)
    for name in (rerank_lib.PROMPT_FILE, rerank_lib.SID_TABLE_FILE):  # what re-ranking needs
      ctx.copy_in(os.path.join(sft_dir, name))
    report.update({k: train_report[k] for k in (
        "iterations", "resumed_from", "skipped_updates", "algorithm", "reward", "shuffle",
        "rollout_tokens_per_sec", "iteration_seconds", "wall_seconds")})
    if c.eval_examples:
      t0 = time.time()
      start = "start" if c.init_from else "sft"
      result, md = loop.final_table(ctx, c, {start: sft_model, "rl": model}, tok, data, sids,
                                    prompt_cfg)
      loop.write_table(ctx, result, md, "rl")
      report["eval_seconds"] = round(time.time() - t0, 1)
      report["table"] = {n: {"R@1": r["R@1"]["mean"],
                             "R@1_lift": r.get("lift", {}).get("R@1")}
                         for n, r in result["rows"].items()}
      report["valid_rate"] = {n: d["valid_rate"] for n, d in result["diagnostics"].items()}
  report["wall_seconds"] = round(time.time() - t_start, 1)
  ctx.write_json("report.json", report)
  return report
