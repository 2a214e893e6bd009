"""The compressor's GRPO loop and the evaluation of the re-ranker on compressed contexts.

One iteration: draw `rollout_prompts` training slates that have a positive and a negative (a
seeded function of the iteration, so a resumed run draws the same ones); sample `group_size`
summaries each; score each summary (`gr2_jax.compress.rewards`): compression in the re-ranker's
prompt tokens, the ellipsis penalty, and the quality term (the frozen re-ranker's AUC with the
summary against its AUC with the full history, greedy under the slate constraint; the judge; the
genres and decades it names that are true of the history; or a mean of several);
then the RL algorithm's group advantages and update (`gr2_jax.rl.algorithm`, the rl stage's
`Policy` with its jitted step, checkpoints and resume).
"""

import os
import time

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from gr2_jax.compress import context as ctx_lib
from gr2_jax.compress import judge as judge_lib
from gr2_jax.compress import rewards
from gr2_jax.errors import UserError
from gr2_jax.eval import compare
from gr2_jax.eval import metrics
from gr2_jax.eval import tables
from gr2_jax.rerank import evaluate as rerank_lib
from gr2_jax.rl import algorithm
from gr2_jax.rl import loop as rl_loop
from gr2_jax.rl import rollout as rollout_lib
from gr2_jax.sampling import constraints
from gr2_jax.train import metrics_log
from gr2_jax.train import trainer as trainer_lib


def check_config(c):
  if c.quality not in rewards.QUALITIES:
    raise UserError(f"compress.quality must be one of {', '.join(rewards.QUALITIES)}, got "
                    f"{c.quality!r}")
  if "judge" in c.quality and bool(c.judge.endpoint) == bool(c.judge.checkpoint):
    raise UserError("compress.quality uses the judge: set one of compress.judge.endpoint (the "
                    "base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000) and "
                    "compress.judge.checkpoint (a model artifact folder judged in this process)")
  if not 0 <= c.alpha <= 1:
    raise UserError(f"compress.alpha must be in [0, 1], got {c.alpha}")
  if c.no_repeat_ngram < 0:
    raise UserError(f"compress.no_repeat_ngram must be >= 0 (0 = off), got {c.no_repeat_ngram}")
  if c.max_words < 1:
    raise UserError(f"compress.max_words must be >= 1, got {c.max_words}")
  reference_names(c)
  return rl_loop.check_algorithm(c, "compress")


REFERENCE_ROWS = {"template": "re-ranker, template summary (reference)",
                  "none": "re-ranker, no history (reference)"}


def reference_names(c):
  """The reference rows of the table named by `c.reference_rows` ("template,none"; "" = none)."""
  names = [n.strip() for n in c.reference_rows.split(",") if n.strip()]
  bad = [n for n in names if n not in REFERENCE_ROWS]
  if bad:
    raise UserError(f"compress.reference_rows: unknown {', '.join(map(repr, bad))}; use a "
                    f"comma-separated list of {', '.join(REFERENCE_ROWS)} (or '')")
  return names


def reference_summaries(name, slates, items, max_history):
  """What a reference row shows in place of each slate's history: "template" the statistics
  summary the warm-up imitates (`context.template_summary` of the items the compressor reads),
  "none" an empty summary block (the re-ranker without the history)."""
  if name == "none":
    return [" "] * len(slates["slate"])
  out = []
  for i in range(len(slates["slate"])):
    hist, ratings = ctx_lib.slate_histories(slates, i)
    out.append(ctx_lib.template_summary(hist[-max_history:], ratings[-max_history:], items))
  return out


def make_judge(c, rt):
  """The judge client of the section (None without the judge), its local checkpoint loaded on
  the runtime `rt`'s mesh."""
  if "judge" not in c.quality:
    return None
  j = c.judge
  cfg = judge_lib.JudgeConfig(
      endpoint=j.endpoint, checkpoint=j.checkpoint, batch_size=j.batch_size, model=j.model,
      timeout_s=j.timeout_s, max_retries=j.max_retries, backoff_s=j.backoff_s,
      max_tokens=j.max_tokens, fallback=j.fallback)
  complete = None
  if j.checkpoint:
    model, tok = rt.load(j.checkpoint)  # one line if the folder holds no model
    complete = judge_lib.local_completer(model, tok, j.max_tokens, j.batch_size)
    logging.info("[compress] judge: %s, in this process", j.checkpoint)
  return judge_lib.JudgeClient(cfg, complete)


def warmup(ctx, c, rt, model, tok, data):
  """`warmup_steps` SFT steps on template summaries of training slates (a model that never
  summarised learns the format and to stop); returns (model, report)."""
  if not c.warmup_steps:
    return model, None
  rng = np.random.default_rng(c.seed)
  train = data["train"]
  idx = np.sort(rng.choice(len(train["slate"]), min(c.warmup_examples, len(train["slate"])),
                           replace=False))
  examples = ctx_lib.warmup_examples({k: v[idx] for k, v in train.items()}, data["items"],
                                     data["users"], tok, max_words=c.max_words,
                                     max_history=c.max_history)
  model, fit = trainer_lib.fit_examples(
      model, examples, steps=c.warmup_steps, batch_size=c.warmup_batch,
      learning_rate=c.warmup_lr, weight_decay=c.weight_decay, clip_norm=c.clip_norm,
      frozen_layers=c.frozen_layers, mesh=rt.mesh, rules=rt.rules, workdir=ctx.path("warmup"),
      name="compress/warmup", pad_id=tok.pad_id, seed=c.seed)
  report = {"examples": len(examples), **fit,
            "sample": ctx_lib.template_summary(*ctx_lib.slate_histories(train, int(idx[0])),
                                               data["items"])}
  logging.info("[compress] warm-up on %d template summaries: loss %s -> %s", len(examples),
               report["first_loss"], report["final_loss"])
  return model, report


def summarise(model, tok, prompt_ids, c, *, greedy, key):
  """(texts, responses, logps, finished) of one summary per prompt.

  Greedy summaries (evaluation, the re-ranker's contexts) never repeat an n-gram of
  `c.no_repeat_ngram` tokens (0 = off), the guard against greedy decoding's loops; sampled
  rollouts are unconstrained, so their log-probs are the policy's.
  """
  make_constraint = None
  if greedy and c.no_repeat_ngram:
    cons = constraints.no_repeat_ngram(c.no_repeat_ngram, model.cfg.vocab_size,
                                       c.max_new_tokens)

    def make_constraint(start, real):  # the same for every batch
      del start, real
      return cons
  responses, logps, finished, _ = rerank_lib.generate(
      model, tok, prompt_ids, max_new_tokens=c.max_new_tokens, batch_size=c.rollout_batch,
      make_constraint=make_constraint, greedy=greedy, temperature=c.temperature, key=key)
  texts = [tok.decode(r[:-1] if f and r else r).strip() for r, f in zip(responses, finished)]
  return texts, responses, logps, np.asarray(finished, bool)


class Reranker:
  """The frozen re-ranker: its greedy order under the slate constraint, and per-slate AUCs."""

  def __init__(self, model, tok, sids, prompt_cfg, data, max_new_tokens, batch_size):
    self.model, self.tok, self.sids, self.prompt_cfg = model, tok, sids, prompt_cfg
    self.data = data
    self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
    self.row = rerank_lib.row_name("r", True)

  def orders(self, slates, summaries=None):
    orders, diags, _ = rerank_lib.evaluate_checkpoint(
        self.model, self.tok, "r", slates, self.data["items"], self.sids, self.prompt_cfg,
        self.data["users"], max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
        constrained=(True,), summaries=summaries)
    return orders[self.row], diags[self.row]

  def aucs(self, slates, summaries=None):
    order, _ = self.orders(slates, summaries)
    return metrics.auc(np.take_along_axis(slates["labels"], order, axis=1))


def score(texts, finished, batch, c, reranker, judge, ctx_texts, ctx_tokens, auc_full):
  """({component: float32 [N]}, counts) of N = P * G summaries (row p * G + g); lengths in the
  re-ranker's prompt tokens, as `ctx_tokens`."""
  g = c.group_size
  sum_tokens = ctx_lib.summary_tokens(texts, reranker.tok)
  o = np.repeat(ctx_tokens, g)
  empty = np.asarray([not t for t in texts])
  overlong = (sum_tokens >= o) & ~empty  # (one cut at the budget gets lambda_ellipsis = 0)
  comp = rewards.compression(sum_tokens, o)
  penalty = rewards.ellipsis_penalty(texts, np.repeat(ctx_texts, g), finished)
  parts = {"compression": comp, "ellipsis": penalty}
  quality = []
  if "utility" in c.quality:
    rows = {k: np.repeat(v, g, axis=0) for k, v in batch.items()}
    auc_c = reranker.aucs(rows, [t or " " for t in texts])
    parts["utility"] = rewards.utility(auc_c, np.repeat(auc_full, g))
    quality.append(parts["utility"])
  if "preservation" in c.quality:
    items = reranker.data["items"]
    shares = [ctx_lib.history_shares(ctx_lib.slate_histories(batch, i)[0][-c.max_history:], items)
              for i in range(len(batch["slate"]))]
    parts["preservation"] = rewards.preservation(
        texts, [shares[i // g][0] for i in range(len(texts))],
        [shares[i // g][1] for i in range(len(texts))], catalogue_genres(items))
    quality.append(parts["preservation"])
  if judge is not None:
    cand = [", ".join(reranker.data["items"][int(i)]["title"] for i in s) for s in batch["slate"]]
    parts["judge"] = np.asarray(judge.score_many([ctx_texts[i // g] for i in range(len(texts))],
                                                 texts, [cand[i // g] for i in range(len(texts))]),
                                np.float32)
    quality.append(parts["judge"])
  parts["total"] = rewards.total(comp, np.mean(quality, axis=0), penalty, alpha=c.alpha,
                                 empty=empty, overlong=overlong,
                                 empty_reward=c.empty_reward, overlong_reward=c.overlong_reward)
  parts["kept"] = (sum_tokens / np.maximum(o, 1)).astype(np.float32)
  return parts, {"empty": int(empty.sum()), "overlong": int(overlong.sum())}


def catalogue_genres(items):
  """The genre names of the catalogue, sorted."""
  return sorted({g for it in items for g in it.get("genres") or ()})


def _signal(slates):
  lab = slates["labels"] > 0
  return lab.any(1) & ~lab.all(1)


def train(ctx, c, rt, model, tok, reranker, data):
  """GRPO iterations of the compressor; returns (model, report)."""
  alg = check_config(c)
  g, p_roll, p_train = c.group_size, c.rollout_prompts, c.train_groups
  total_updates = c.iterations * c.ppo_epochs * c.minibatches
  workdir = ctx.path("train")
  pol = rl_loop.Policy(model, c, alg, rt, workdir, "compress", total_updates)
  state, meta = pol.restore_or_init()
  start = 0 if meta is None else int(meta["step"])
  history = [] if meta is None else meta["history"]
  counts = {"empty": 0, "overlong": 0, "skipped_updates": 0}
  if meta is not None:
    counts.update(meta.get("counts", {}))
    logging.info("[compress] resumed at iteration %d", start)
  train_slates = {k: v[_signal(data["train"])] for k, v in data["train"].items()}
  n_train = len(train_slates["slate"])
  if n_train < p_roll:
    raise UserError(f"{n_train} training slates with a positive and a negative cannot fill "
                    f"{p_roll} rollout prompts")
  judge = make_judge(c, rt)
  logger = metrics_log.MetricsLogger(os.path.join(workdir, "tb"), c.iterations, "[compress] ")
  t_stage = time.time()
  try:
    for it in range(start, c.iterations):
      t0 = time.time()
      rng = np.random.default_rng([c.seed, it])
      idx = np.sort(rng.choice(n_train, size=p_roll, replace=False))
      batch = {k: v[idx] for k, v in train_slates.items()}
      prompts = ctx_lib.compressor_prompts(batch, data["items"], data["users"], tok,
                                           max_words=c.max_words, max_history=c.max_history)
      prompts = [p for p in prompts for _ in range(g)]
      texts, responses, logps, finished = summarise(
          pol.tr.model(state["params"]), tok, prompts, c, greedy=False,
          key=jax.random.fold_in(jax.random.key(c.seed), it))
      t_roll = time.time() - t0
      ctx_texts = [ctx_lib.context_text(*ctx_lib.slate_histories(batch, i), data["items"],
                                        max_history=c.max_history) for i in range(p_roll)]
      ctx_tokens = ctx_lib.context_tokens(batch, data["items"], reranker.sids,
                                          reranker.prompt_cfg, reranker.tok)
      auc_full = reranker.aucs(batch) if "utility" in c.quality else np.zeros(p_roll)
      parts, n = score(texts, finished, batch, c, reranker, judge, ctx_texts, ctx_tokens,
                       auc_full)
      counts["empty"] += n["empty"]
      counts["overlong"] += n["overlong"]
      plan = algorithm.plan_update(parts["total"].reshape(p_roll, g), np.ones(p_roll, bool),
                                   alg, p_train)
      state, step_metrics, skipped = rl_loop.update(
          pol, state, prompts, responses, logps, plan, c, tok.pad_id, rng,
          pol.reference_logps if pol.ref_params is not None else None)
      counts["skipped_updates"] += skipped
      if skipped:
        logging.warning("[compress] iteration %d: %d of %d updates skipped (no reward variance "
                        "or a non-finite step)", it + 1, skipped, len(step_metrics))
      lengths = np.asarray([len(r) for r in responses])
      m = {"reward": float(parts["total"].mean()),
           **{f"reward/{k}": float(np.mean(v)) for k, v in parts.items()
              if k not in ("total", "kept")},
           "context_kept": float(parts["kept"].mean()),
           "summary_tokens": float(lengths.mean()), "empty": n["empty"],
           "overlong": n["overlong"], "groups_kept": float(plan.keep.mean()),
           "loss": float(np.mean([x["loss"] for x in step_metrics])),
           "applied_updates": len(step_metrics) - skipped,
           "rollout_tokens_per_sec": float(lengths.sum() / max(t_roll, 1e-9)),
           "iteration_seconds": time.time() - t0}
      logger.write(it + 1, m)
      logging.info("[compress] iter %d/%d reward %.3f (compression %.3f ellipsis %.2f%s) kept "
                   "%.1f%% of the context, summary %.0f tokens, empty %d overlong %d | rollout "
                   "%.0f tok/s, iter %.1fs", it + 1, c.iterations, m["reward"],
                   m["reward/compression"], m["reward/ellipsis"],
                   "".join(f" {k} {m['reward/' + k]:.3f}" for k in rewards.QUALITY_TERMS
                           if "reward/" + k in m),
                   100 * m["context_kept"], m["summary_tokens"], n["empty"], n["overlong"],
                   m["rollout_tokens_per_sec"], m["iteration_seconds"])
      history.append({"iteration": it + 1, **m, "sample": texts[0][:200]})
      done = it + 1
      if done % c.checkpoint_every == 0 or done == c.iterations:
        pol.manager.save(done, state, {"history": history, "counts": counts}, force=True)
  finally:
    logger.close()
    pol.manager.close()
    if judge is not None:
      judge.close()
  report = {"iterations": c.iterations, "resumed_from": start, "counts": counts,
            "quality": c.quality, "wall_seconds": round(time.time() - t_stage, 1),
            "history": history, "judge": judge.summary() if judge is not None else None}
  return pol.tr.model(state["params"]), report


def greedy_summaries(model, tok, c, data, slates):
  """(texts, finished): the compressor's greedy summary of each slate's history as the
  re-ranking prompt shows it (" " for an empty one)."""
  prompts = ctx_lib.compressor_prompts(slates, data["items"], data["users"], tok,
                                       max_words=c.max_words, max_history=c.max_history)
  texts, _, _, finished = summarise(model, tok, prompts, c, greedy=True, key=jax.random.key(0))
  return [t or " " for t in texts], finished


def compressor_contexts(model, tok, c, data):
  """(slates) -> `greedy_summaries` texts: the contexts of the re-ranker's RL on summaries."""
  return lambda slates: greedy_summaries(model, tok, c, data, slates)[0]


def rerank_rl(ctx, c, rt, rl_c, reranker, model, tok, data):
  """`c.rerank_rl_iterations` RL iterations of the re-ranker with the rl stage's settings, from
  the RL model, once on full contexts and once with the compressor's summaries in place of the
  histories (the same slates and seeds): {"full" | "compressed": (model, report)}, or {}."""
  if not c.rerank_rl_iterations:
    return {}
  sec = rl_c.copy_and_resolve_references()
  sec.iterations = c.rerank_rl_iterations
  sec.eval_every = 0
  sec.checkpoint_every = c.rerank_rl_iterations
  graphdef, state = nnx.split(reranker.model)
  out = {}
  for name, contexts in (("full", None), ("compressed", compressor_contexts(model, tok, c, data))):
    fresh = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))  # the RL step donates its state
    logging.info("[compress] re-ranker RL on %s contexts: %d iterations", name, sec.iterations)
    out[name] = rl_loop.train_policy(ctx, sec, f"rerank_rl_{name}", fresh, reranker.tok, data,
                                     reranker.sids, reranker.prompt_cfg, rt, contexts=contexts)
  return out


def rl_timing(runs):
  """Mean seconds per RL iteration (and its rollout) on full vs compressed contexts, over the
  iterations after the first (which compiles) when there are several."""
  out = {}
  for name, (_, report) in runs.items():
    hist = report["history"]
    steady = hist[1:] if len(hist) > 1 else hist
    out[name] = {k: float(np.mean([h[k] for h in steady]))
                 for k in ("iteration_seconds", "rollout_seconds", "prompt_tokens",
                           "context_seconds") if k in steady[0]}
    out[name]["iterations_timed"] = len(steady)
  if "full" in out and "compressed" in out:
    out["ratio"] = (out["compressed"]["iteration_seconds"]
                    / max(out["full"]["iteration_seconds"], 1e-9))
  return out


def evaluate(c, model, tok, reranker, slates, data, rl_c, rl_runs=None):
  """The table: legacy, the re-ranker with the full and the compressed context (and, after
  `rerank_rl`, the re-ranker RL-trained on compressed contexts); the context kept; the
  re-ranker's RL rollout time with each, and its RL iteration time; three sample summaries."""
  texts, finished = greedy_summaries(model, tok, c, data, slates)
  ctx_tokens = ctx_lib.context_tokens(slates, data["items"], reranker.sids, reranker.prompt_cfg,
                                      reranker.tok)
  kept = ctx_lib.summary_tokens(texts, reranker.tok) / np.maximum(ctx_tokens, 1)
  logging.info("[compress] greedy summaries of %d slates: %.1f%% of the history block kept "
               "(median %.1f%%), %d cut at the budget; re-ranking them", len(texts),
               100 * kept.mean(), 100 * np.median(kept), int((~finished).sum()))
  histories = {tuple(ctx_lib.slate_histories(slates, i)[0][-c.max_history:])
               for i in range(len(texts))}
  distinct = {"summaries": len(set(texts)), "histories": len(histories)}
  logging.info("[compress] %d distinct greedy summaries of %d distinct histories",
               distinct["summaries"], distinct["histories"])
  full, d_full = reranker.orders(slates)
  comp, d_comp = reranker.orders(slates, texts)
  k = slates["slate"].shape[1]
  orders = {"legacy": np.tile(np.arange(k), (len(slates["slate"]), 1)),
            "re-ranker, full context": full, "re-ranker, compressed context": comp}
  pairs = [("re-ranker, compressed context", "re-ranker, full context")]
  valid = {"full": d_full["valid_rate"], "compressed": d_comp["valid_rate"]}
  ref_kept = {}
  for name in reference_names(c):
    ref = reference_summaries(name, slates, data["items"], c.max_history)
    orders[REFERENCE_ROWS[name]], d = reranker.orders(slates, ref)
    valid[name] = d["valid_rate"]
    pairs.append((REFERENCE_ROWS[name], "re-ranker, full context"))
    ref_kept[name] = float(np.mean(ctx_lib.summary_tokens(ref, reranker.tok)
                                   / np.maximum(ctx_tokens, 1)))
  rl_runs = rl_runs or {}
  if "compressed" in rl_runs:
    tuned = Reranker(rl_runs["compressed"][0], reranker.tok, reranker.sids, reranker.prompt_cfg,
                     data, reranker.max_new_tokens, reranker.batch_size)
    name = "re-ranker RL-trained on compressed contexts, compressed context"
    orders[name], d = tuned.orders(slates, texts)
    valid["rl_compressed"] = d["valid_rate"]
    pairs.append((name, "re-ranker, full context"))
  rows = tables.evaluate(orders, slates, n_boot=c.n_boot, seed=c.seed)
  paired = compare.paired_rows(orders, slates, pairs, c.n_boot, c.seed)
  timing = rollout_seconds(reranker, slates, texts, rl_c, c)
  rl_time = rl_timing(rl_runs) if rl_runs else None
  samples = []  # the first three slates with distinct histories (a user may have several)
  for i in range(len(texts)):
    hist, ratings = ctx_lib.slate_histories(slates, i)
    lines = ctx_lib.history_lines(hist[-c.max_history:], ratings[-c.max_history:], data["items"])
    if all(s["context"] != lines for s in samples):
      samples.append({"context": lines, "summary": texts[i]})
    if len(samples) == 3:
      break
  md = [f"Re-ranking {len(texts)} seeded {c.eval_split} slates with the full history and with the "
        "compressor's summary in its place (the re-ranker greedy under the slate constraint):",
        "", tables.format_table(rows), "",
        compare.paired_markdown(paired), "",
        f"Context kept: {100 * kept.mean():.1f}% of the history block's tokens (a block of "
        f"{ctx_tokens.mean():.1f} tokens on average; median "
        f"{100 * np.median(kept):.1f}%; summaries cut at the budget: {int((~finished).sum())}; "
        f"{distinct['summaries']} distinct summaries of {distinct['histories']} distinct "
        "histories)." + "".join(f" The {n} reference keeps {100 * v:.1f}%." for n, v in
                                ref_kept.items()),
        f"The re-ranker's RL rollout ({timing['prompts']} prompts x {timing['group_size']} "
        f"samples, {timing['max_new_tokens']} new tokens): {timing['full_s']:.2f} s with the full "
        f"context, {timing['compressed_s']:.2f} s compressed (ratio "
        f"{timing['compressed_s'] / max(timing['full_s'], 1e-9):.2f}); prompts "
        f"{timing['full_prompt_tokens']:.0f} vs {timing['compressed_prompt_tokens']:.0f} tokens."]
  if rl_time:
    f, r = rl_time["full"], rl_time["compressed"]
    md.append(
        f"The re-ranker's RL iteration (the rl stage's settings, {c.rerank_rl_iterations} "
        f"iterations from the RL model on each, mean of {f['iterations_timed']} after the "
        f"first): {f['iteration_seconds']:.2f} s on full contexts, {r['iteration_seconds']:.2f} "
        f"s on compressed ones (ratio {rl_time['ratio']:.2f}; rollouts "
        f"{f['rollout_seconds']:.2f} vs {r['rollout_seconds']:.2f} s; prompts "
        f"{f['prompt_tokens']:.0f} vs {r['prompt_tokens']:.0f} tokens), plus "
        f"{r['context_seconds']:.2f} s per iteration to write the summaries.")
  md += ["", "Sample summaries:"]
  for s in samples:
    md += ["", "History: " + " / ".join(s["context"][-6:]), f"Summary: {s['summary']}"]
  result = {"rows": rows, "paired": paired, "context_kept_mean": float(kept.mean()),
            "context_tokens_mean": float(ctx_tokens.mean()),
            "context_kept_median": float(np.median(kept)), "timing": timing,
            "rl_timing": rl_time, "samples": samples, "valid_rate": valid,
            "distinct": distinct, "reference_kept": ref_kept}
  return result, "\n".join(md)


def rollout_seconds(reranker, slates, texts, rl_c, c):
  """Seconds of one re-ranker RL rollout (the rl stage's sampling settings) on the first
  `timing_prompts` slates, full vs compressed; each timed on its second run (the first
  compiles)."""
  n = min(c.timing_prompts, len(texts))
  part = {k: v[:n] for k, v in slates.items()}
  out = {"prompts": n, "group_size": rl_c.group_size, "max_new_tokens": rl_c.max_new_tokens}
  for name, summ in (("full", None), ("compressed", texts[:n])):
    for _ in range(2):
      t0 = time.time()
      ro = rollout_lib.rollout(
          reranker.model, reranker.tok, part, reranker.data["items"], reranker.sids,
          reranker.prompt_cfg, reranker.data["users"], group_size=rl_c.group_size,
          shuffle=rl_c.shuffle, key=jax.random.key(0), rng=np.random.default_rng(0),
          max_new_tokens=rl_c.max_new_tokens, temperature=rl_c.temperature,
          batch_size=rl_c.rollout_batch, constrain_ranking=rl_c.constrain_ranking,
          summaries=summ)
      out[f"{name}_s"] = time.time() - t0
    out[f"{name}_prompt_tokens"] = float(np.mean([len(p) for p in ro.prompts]))
  return out

