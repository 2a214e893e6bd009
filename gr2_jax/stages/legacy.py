"""Legacy stage: train SASRec on the legacy period, then cut each example's top-K slate.

With `data.source=impressions` the served lists are the slates: the data stage built them, and
this stage only links them into its artifact (no SASRec is trained).
"""

import json
import os
import shutil
import time

import numpy as np
from absl import logging

from gr2_jax.data import artifacts
from gr2_jax.data import preprocess
from gr2_jax.data import sasrec
from gr2_jax.data import slates as slates_lib
from gr2_jax.errors import UserError
from gr2_jax.eval import metrics


def _subsample(examples, max_examples, seed):
  """Keeps at most max_examples[i] random examples of split i (0 = all); ids stay row numbers
  of the data artifact's examples.npz (kept in `row`)."""
  if len(max_examples) != len(slates_lib.SPLITS):
    raise UserError(f"legacy.max_examples needs one count per split "
                    f"({', '.join(slates_lib.SPLITS.values())}), got {tuple(max_examples)}")
  rng = np.random.default_rng(seed)
  keep = []
  for cap, period in zip(max_examples, slates_lib.SPLITS):
    idx = np.flatnonzero(examples["period"] == period)
    if cap and idx.size > cap:
      idx = np.sort(rng.choice(idx, cap, replace=False))
    keep.append(idx)
  keep = np.concatenate(keep)
  out = {k: v[keep] for k, v in examples.items()}
  out["row"] = keep.astype(np.int64)
  return out


def _from_impressions(ctx):
  data_dir = ctx.inputs["data"]
  with open(os.path.join(data_dir, "report.json")) as f:
    built = json.load(f)["slates"]
  src = os.path.join(data_dir, "tfds")
  dst = ctx.path("tfds")
  if os.path.exists(dst):
    shutil.rmtree(dst)
  try:  # hard links: the shards are not copied
    shutil.copytree(src, dst, copy_function=os.link)
  except OSError:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
  np.save(ctx.path("popularity.npy"), slates_lib.popularity(artifacts.load_interactions(data_dir)))
  report = {"source": "impressions", "slate_size": built["slate_size"],
            "coverage": {split: {"slates": n} for split, n in built["per_split"].items()}}
  with open(ctx.path("report.json"), "w") as f:
    json.dump(report, f, indent=2)
  logging.info("[legacy] impressions: the served lists are the slates (K=%d): %s; no legacy "
               "ranker trained", built["slate_size"], built["per_split"])
  return report


def run(ctx):
  c = ctx.section
  if ctx.config.data.source == "impressions":
    return _from_impressions(ctx)
  data_dir = ctx.inputs["data"]
  inter = artifacts.load_interactions(data_dir)
  examples = preprocess.load_examples(os.path.join(data_dir, "examples.npz"))
  num_items = len(artifacts.load_items(data_dir))
  if c.slate_size < 2 or c.slate_size >= num_items:
    raise UserError(f"legacy.slate_size must be in [2, {num_items - 1}], got {c.slate_size}")
  cfg = sasrec.config_of(c, num_items)
  start = time.time()
  model = sasrec.train_or_restore(ctx.path("sasrec"), cfg, inter,
                                  inter["period"] == artifacts.PERIODS.index("legacy"), c)
  train_seconds = time.time() - start
  pop = slates_lib.popularity(inter)
  np.save(ctx.path("popularity.npy"), pop)

  examples = _subsample(examples, c.max_examples, c.seed)
  excluded = slates_lib.exclusion_lists(examples, inter)
  start = time.time()
  slate, slate_scores, rank_sasrec, rank_pop = sasrec.rank_and_top_k(
      model, examples["history"], excluded, examples["target"], pop, c.slate_size,
      batch_size=c.score_batch)
  logging.info("[legacy] scored %d examples against %d items in %.1fs",
               len(examples["target"]), num_items, time.time() - start)

  labels, grades = slates_lib.labels_for(slate, examples, c.positive_rating)
  in_slate = rank_sasrec < c.slate_size
  target_index = np.where(in_slate, rank_sasrec, -1).astype(np.int32)
  report = {"sasrec_train_seconds": round(train_seconds, 1), "slate_size": c.slate_size,
            "coverage": {}, "full_catalogue": {}}
  records = {}
  for period, split in slates_lib.SPLITS.items():
    m = examples["period"] == period
    keep = m & in_slate
    report["coverage"][split] = {"examples": int(m.sum()), "slates": int(keep.sum()),
                                 "coverage": float(keep.sum() / max(m.sum(), 1))}
    idx = np.flatnonzero(keep)
    records[split] = {k: examples[k][idx] for k in (
        "user", "timestamp", "history", "history_rating", "history_len", "target",
        "target_rating")}
    records[split].update(example_id=examples["row"][idx], target_index=target_index[idx],
                          slate=slate[idx], slate_scores=slate_scores[idx], labels=labels[idx],
                          grades=grades[idx])
  val = examples["period"] == 2
  for name, ranks in (("sasrec", rank_sasrec), ("popularity", rank_pop)):
    r = ranks[val]
    hr = metrics.recall_at_k(r, 10)
    nd = metrics.ndcg_at_k(r, 10)
    report["full_catalogue"][name] = {
        "HR@10": metrics.bootstrap_ci(hr, seed=c.seed),
        "NDCG@10": metrics.bootstrap_ci(nd, seed=c.seed),
    }
  slates_lib.write(ctx.path("tfds"), records, c.slate_size)
  with open(ctx.path("report.json"), "w") as f:
    json.dump(report, f, indent=2)
  for name, r in report["full_catalogue"].items():
    logging.info("[legacy] validation full catalogue %-10s HR@10 %.4f  NDCG@10 %.4f", name,
                 r["HR@10"]["mean"], r["NDCG@10"]["mean"])
  for split, cov in report["coverage"].items():
    logging.info("[legacy] %-10s slates %6d of %6d examples (coverage %.3f)", split,
                 cov["slates"], cov["examples"], cov["coverage"])
  return report
