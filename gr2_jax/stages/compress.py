"""Compress stage: GRPO trains the context compressor (from the mid-trained model) on
compression and quality rewards; then (`rerank_rl_iterations` > 0) a few RL iterations of the
re-ranker from the RL model on full and on compressed contexts, timed; then the RL re-ranker
re-ranks test slates with the full history and with the compressor's summary in its place, and
the re-ranker RL-trained on summaries with its summaries (`gr2_jax.compress.train` documents an
iteration).

Artifact: `model/`, `model_config.json`, `tokenizer/` (the compressor), `train/` (checkpoints
that resume, metrics.jsonl, TensorBoard), `rerank_rl_full/`, `rerank_rl_compressed/` (the
re-ranker's RL checkpoints and logs), `table.json` / `table.md` (full vs compressed context:
metrics with intervals, the paired differences, context kept, rollout and RL iteration times,
sample summaries), `report.json` (reward curves, empty / over-long counts, the judge's call
statistics, the re-ranker's RL reports).
"""

import time

from absl import logging

from gr2_jax import runner
from gr2_jax.compress import train as ctrain
from gr2_jax.data import slates as slates_lib
from gr2_jax.errors import UserError
from gr2_jax.parallel import runtime as runtime_lib
from gr2_jax.rerank import evaluate as rerank_lib
from gr2_jax.rl import loop as rl_loop


def run(ctx):
  return runtime_lib.run_stage(ctx, _run)


def _run(ctx, rt):
  c = ctx.section
  ctrain.check_config(c)
  t_start = time.time()
  rl_dir = ctx.inputs["rl"]
  prompt_cfg, sids = rerank_lib.load_rerank_info(rl_dir)
  data = rl_loop.load_data(ctx, c, prompt_cfg)
  rr_model, rr_tok = rt.load(rl_dir)
  reranker = ctrain.Reranker(rr_model, rr_tok, sids, prompt_cfg, data,
                             ctx.config.rl.max_new_tokens, c.eval_batch)
  start = c.init_from or runner.artifact_dir(ctx.workdir, ctx.config, "midtrain")
  model, tok = rt.load(start)
  logging.info("[compress] compressor from %s, frozen re-ranker %s, quality %s", start, rl_dir,
               c.quality)
  model, warm = ctrain.warmup(ctx, c, rt, model, tok, data)
  model, report = ctrain.train(ctx, c, rt, model, tok, reranker, data)
  report["warmup"] = warm
  rt.save(ctx.out_dir, model, tok)
  rl_runs = ctrain.rerank_rl(ctx, c, rt, ctx.config.rl, reranker, model, tok, data)
  if rl_runs:
    report["rerank_rl"] = {name: {k: v for k, v in r.items() if k != "algorithm"}
                           for name, (_, r) in rl_runs.items()}
  if c.eval_examples:
    slates = slates_lib.load_split(data["legacy_dir"], c.eval_split, max_examples=c.eval_examples,
                                   seed=c.seed)
    if not len(slates.get("slate", ())):
      raise UserError(f"no {c.eval_split} slates in {data['legacy_dir']}; use more data")
    t0 = time.time()
    result, md = ctrain.evaluate(c, model, tok, reranker, slates, data, ctx.config.rl, rl_runs)
    ctx.write_json("table.json", result)
    ctx.write_text("table.md", md + "\n")
    logging.info("[compress] final table:\n%s", md)
    print(md)
    report["eval_seconds"] = round(time.time() - t0, 1)
    report["context_kept"] = result["context_kept_mean"]
    report["table"] = {n: {m: r[m]["mean"] for m in ("R@1", "R@3", "N@3")}
                       for n, r in result["rows"].items()}
  report["wall_seconds"] = round(time.time() - t_start, 1)
  ctx.write_json("report.json", report)
  return {k: v for k, v in report.items() if k != "history"}
