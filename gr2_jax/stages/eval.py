"""Eval stage: the re-ranking table on the test (or validation) slates.

With `checkpoints`, a second table compares models re-ranking a seeded subset of the slates
(greedy decoding, with and without the slate constraint; an invalid answer counts as the
legacy order) with the baselines on the same subset, plus each model's diagnostics.
"""

import json
import os
import time

import numpy as np
from absl import logging

from gr2_jax.data import artifacts
from gr2_jax.data import slates as slates_lib
from gr2_jax import runner
from gr2_jax.errors import UserError
from gr2_jax.eval import metrics
from gr2_jax.eval import tables
from gr2_jax.parallel import mesh as mesh_lib
from gr2_jax.rankers import scores as scores_lib
from gr2_jax.rerank import evaluate as rerank_lib
from gr2_jax.stages import midtrain
from gr2_jax.teachers import evidence as evidence_lib


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


def parse_checkpoints(entries):
  """{name: folder} of "name=folder" entries."""
  out = {}
  for e in entries:
    name, sep, path = str(e).partition("=")
    if not sep or not name.strip() or not path.strip():
      raise UserError(f"eval.checkpoints entries must read name=folder, got {e!r}")
    if name.strip() in out or name.strip() in BASELINES:
      raise UserError(f"eval.checkpoints names must be unique and not a baseline's: {e!r}")
    out[name.strip()] = path.strip()
  return out


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


def model_table(ctx, popularity):
  """Rows and diagnostics of the checkpoints and the baselines on the model subset."""
  c = ctx.section
  legacy_dir = ctx.inputs["legacy"]
  data_dir = runner.artifact_dir(ctx.workdir, ctx.config, "data")  # an input of legacy
  items, users = artifacts.load_items(data_dir), artifacts.load_users(data_dir)
  slates = slates_lib.load_split(legacy_dir, c.split, max_examples=c.model_examples,
                                 seed=c.seed)
  checkpoints = parse_checkpoints(c.checkpoints)
  for path in checkpoints.values():
    if not os.path.isdir(path):
      raise UserError(f"eval.checkpoints: {path} does not exist")

  def loader(path):
    def load():
      prompt_cfg, sids = rerank_lib.load_rerank_info(path)
      if len(sids) != len(items):
        raise UserError(f"{path} was trained on a SID table of {len(sids)} items but the data "
                        f"has {len(items)}; evaluate it in its own workdir")
      model, tok = midtrain.load_model(path, mesh_lib.single_device_mesh())
      return model, tok, sids, prompt_cfg
    return load

  return compare_models(
      slates, popularity, [(name, loader(path)) for name, path in checkpoints.items()],
      items=items, users=users, rankers=tuple(c.rankers), seed=c.seed, n_boot=c.n_boot,
      max_new_tokens=c.max_new_tokens, batch_size=c.batch_size, constrained=c.constrained,
      evidence=lambda prompt_cfg: evidence_lib.for_prompt(prompt_cfg, data_dir),
      rankers_dir=ctx.inputs["rankers"], split=c.split)


def run(ctx):
  c = ctx.section
  legacy_dir = ctx.inputs["legacy"]
  if c.split not in slates_lib.SPLITS.values():
    raise UserError(f"eval.split must be one of {', '.join(slates_lib.SPLITS.values())}, "
                    f"got {c.split!r}")
  slates = slates_lib.load_split(legacy_dir, c.split, max_examples=c.max_examples, seed=c.seed)
  if not len(slates.get("slate", ())):
    raise UserError(f"no {c.split} slates in {legacy_dir}; use more data")
  popularity = np.load(os.path.join(legacy_dir, "popularity.npy"))
  check_rankers(c.rankers)
  if c.split == "train" and set(c.rankers) & set(scores_lib.RANKERS):
    raise UserError("the learned rankers are scored on the validation and test splits only; "
                    "drop them from eval.rankers to evaluate train slates")
  rows = baseline_rows(slates, popularity, c.rankers, c.seed, c.n_boot,
                       ctx.inputs["rankers"], c.split)
  table = tables.format_table(rows)
  result = {"split": c.split, "rows": rows}
  if c.checkpoints:
    result["models"] = model_table(ctx, popularity)
    table += (f"\n\nModels on {result['models']['slates']} seeded {c.split} slates (baselines "
              "scored again on them):\n\n"
              + models_markdown(result["models"]))
  with open(ctx.path("table.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(ctx.path("table.md"), "w") as f:
    f.write(table + "\n")
  logging.info("[eval] table of %d %s slates written to %s", len(slates["slate"]), c.split,
               ctx.path("table.md"))
  print(table)
  summary = {"split": c.split, "slates": int(len(slates["slate"])),
             "R@1": {name: row["R@1"]["mean"] for name, row in rows.items()}}
  if c.checkpoints:
    models = result["models"]
    summary["models"] = {name: {"R@1": row["R@1"]["mean"],
                                "valid_rate": models["diagnostics"].get(name, {}).get(
                                    "valid_rate")}
                         for name, row in models["rows"].items()}
  return summary
