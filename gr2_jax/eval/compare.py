"""Comparing re-rankers on the same slates: the baselines' orders and rows, model rows
(greedy re-ranking, with and without the slate constraint) beside them, and paired row
differences with bootstrap intervals. Used by the eval, RL, OPD and internalize stages."""

import time

import numpy as np
from absl import logging

from gr2_jax.errors import UserError
from gr2_jax.eval import metrics
from gr2_jax.eval import tables
from gr2_jax.rankers import scores as scores_lib
from gr2_jax.rerank import evaluate as rerank_lib


SIMPLE = ("random", "popularity", "legacy")
BASELINES = SIMPLE + scores_lib.RANKERS


def check_rankers(rankers):
  unknown = [r for r in rankers if r not in BASELINES]
  if unknown:
    raise UserError(f"unknown ranker(s) {', '.join(unknown)}; valid: {', '.join(BASELINES)}")


def baseline_orders(slates, popularity, seed, rankers=BASELINES, rankers_dir=None, split=None):
  """{name: order [N, K]} of the named baselines on `slates`, in `BASELINES` order: the simple
  ones, and the learned ones from the rankers artifact `rankers_dir` (its `split` scores)."""
  check_rankers(rankers)
  n, k = slates["slate"].shape
  simple = {
      "random": lambda: tables.random_orders(n, k, seed),
      "popularity": lambda: tables.order_by_scores(popularity[slates["slate"]]),
      "legacy": lambda: np.tile(np.arange(k), (n, 1)),
  }
  learned = [r for r in scores_lib.RANKERS if r in rankers]
  if learned and rankers_dir is None:
    raise UserError(f"rankers {', '.join(learned)} need the rankers stage's artifact")
  learned = scores_lib.orders(rankers_dir, split, slates, learned) if learned else {}
  return {name: simple[name]() if name in simple else learned[name]
          for name in BASELINES if name in rankers}


def baseline_rows(slates, popularity, rankers, seed, n_boot, rankers_dir=None, split=None):
  """Table rows of the named baselines on `slates` (see `baseline_orders`)."""
  orders = baseline_orders(slates, popularity, seed, rankers, rankers_dir, split)
  return tables.evaluate(orders, slates, n_boot=n_boot, seed=seed)


def compare_models(slates, popularity, models, *, items, users, rankers, seed, n_boot,
                   max_new_tokens, batch_size, constrained, log_prefix="eval", evidence=None,
                   rankers_dir=None, split=None, pairs=()):
  """Baselines and models re-ranking the same slates: rows, diagnostics, samples, seconds, and
  the paired lift of the best model row over the best learned baseline.

  Args:
    models: (name, load) pairs; load() -> (model, tokenizer, sids, prompt config[, its own
      max_new_tokens]), called one model at a time.
    evidence: optional function of a model's prompt config that gives its
      `teachers.evidence.SlateEvidence` (None for prompts without the "evidence" field).
    rankers: baselines shown besides "legacy", which every table keeps for the lift; the
      learned ones come from `rankers_dir`'s `split` scores.
  """
  wanted = tuple(rankers) + (() if "legacy" in rankers else ("legacy",))
  orders = baseline_orders(slates, popularity, seed, wanted, rankers_dir, split)
  diags, samples, seconds = {}, {}, {}
  for name, load in models:
    loaded = load()
    model, tok, sids, prompt_cfg = loaded[:4]
    t0 = time.time()
    o, d, smp = rerank_lib.evaluate_checkpoint(
        model, tok, name, slates, items, sids, prompt_cfg, users,
        max_new_tokens=loaded[4] if len(loaded) > 4 else max_new_tokens, batch_size=batch_size,
        constrained=tuple(bool(x) for x in constrained),
        evidence=None if evidence is None else evidence(prompt_cfg))
    seconds[name] = round(time.time() - t0, 1)
    logging.info("[%s] %s re-ranked %d slates in %.1fs", log_prefix, name,
                 len(slates["slate"]), seconds[name])
    orders.update(o)
    diags.update(d)
    samples.update(smp)
  rows = tables.evaluate(orders, slates, n_boot=n_boot, seed=seed)
  best = scores_lib.best_vs_best(orders, slates, list(diags), list(scores_lib.RANKERS),
                                 n_boot=n_boot, seed=seed)
  out = {"slates": int(len(slates["slate"])), "rows": rows, "diagnostics": diags,
         "samples": samples, "seconds": seconds, "best_vs_best": best}
  if pairs:
    out["paired"] = paired_rows(orders, slates, pairs, n_boot, seed)
  return out


PAIRED_METRICS = ("R@1", "R@3", "N@3")


def paired_rows(orders, slates, pairs, n_boot, seed):
  """{"a vs b": {metric: paired bootstrap of a - b}} for row pairs on the same slates."""
  out = {}
  for a, b in pairs:
    if a not in orders or b not in orders:
      raise UserError(f"paired comparison of unknown rows {a!r}, {b!r}")
    va, vb = tables.per_example(orders[a], slates), tables.per_example(orders[b], slates)
    out[f"{a} vs {b}"] = {m: metrics.paired_bootstrap(va[m], vb[m], n_boot=n_boot, seed=seed)
                          for m in PAIRED_METRICS}
  return out


def paired_markdown(paired):
  """One line per pair: the paired differences with their 95% intervals."""
  lines = ["| pair | " + " | ".join(f"{m} difference" for m in PAIRED_METRICS) + " |",
           "|---|" + "---|" * len(PAIRED_METRICS)]
  for name, row in paired.items():
    cells = [f"{r['diff']:+.4f} [{r['diff_lo']:+.4f}, {r['diff_hi']:+.4f}]"
             for r in (row[m] for m in PAIRED_METRICS)]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def models_markdown(result):
  """The model table, its diagnostics and the best-vs-best line of a `compare_models` result."""
  md = tables.format_table(result["rows"]) + "\n\n"
  if result.get("best_vs_best"):
    md += scores_lib.best_vs_best_markdown(result["best_vs_best"]) + "\n\n"
  return md + rerank_lib.diagnostics_markdown(result["diagnostics"])
