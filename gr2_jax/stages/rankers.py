"""Rankers stage: a refreshed legacy ranker, the CF teacher, LambdaMART and a PRM-style listwise
transformer, trained on the training-period slates and scored on the validation and test slates.

Artifact: `scores_validation.npz`, `scores_test.npz` (`rankers/scores.py`), `table.md` /
`table.json` (every ranker on the validation and test slates, with intervals and the paired
lift over legacy), `report.json` (training times, LambdaMART's best round and feature
importances, PRM's validation curve, skipped slates), `lambdamart.txt`, `prm/` (trainer
checkpoints and `standardizer.json`), `sasrec_refreshed/`.
"""

import json
import os
import time

from absl import logging
from flax import nnx
import jax
import numpy as np

from gr2_jax.data import artifacts
from gr2_jax.data import sasrec
from gr2_jax.data import slates as slates_lib
from gr2_jax.errors import UserError
from gr2_jax.eval import tables
from gr2_jax.parallel import mesh as mesh_lib
from gr2_jax.rankers import features as features_lib
from gr2_jax.rankers import lambdamart
from gr2_jax.rankers import prm
from gr2_jax.rankers import scores as scores_lib
from gr2_jax.teachers import cf
from gr2_jax.teachers import cf_stats
from gr2_jax.train import optim
from gr2_jax.train import trainer as trainer_lib

EVAL_SPLITS = ("validation", "test")


def _load(legacy_dir, c):
  out = {
      "train": slates_lib.load_split(legacy_dir, "train", max_examples=c.max_train, seed=c.seed),
      "validation": slates_lib.load_split(legacy_dir, "validation",
                                          max_examples=c.max_validation, seed=c.seed),
      "test": slates_lib.load_split(legacy_dir, "test"),
  }
  for split, s in out.items():
    if not len(s.get("slate", ())):
      raise UserError(f"no {split} slates in {legacy_dir}; the rankers need train, validation "
                      "and test slates")
  if out["train"]["slate"].shape[1] < 2:
    raise UserError("slates of one candidate cannot be re-ranked")
  return out


def _refreshed_legacy(ctx, splits, num_items):
  """SASRec on the legacy + train periods, scoring the evaluation slates."""
  c = ctx.section
  inter = artifacts.load_interactions(ctx.inputs["data"])
  section = ctx.config.legacy.copy_and_resolve_references()
  section.steps = c.refresh_steps
  model = sasrec.train_or_restore(ctx.path("sasrec_refreshed"),
                                  sasrec.config_of(section, num_items), inter,
                                  artifacts.training_mask(inter), section, "[rankers]")
  return {split: sasrec.slate_scores(model, splits[split]["history"], splits[split]["slate"])
          for split in EVAL_SPLITS}


def _train_prm(ctx, x, y, splits, report):
  c = ctx.section
  p = c.prm
  table = np.load(os.path.join(ctx.inputs["sids"], "item_embeddings.npy")).astype(np.float32)
  std = prm.Standardizer(x["train"])
  os.makedirs(ctx.path("prm"), exist_ok=True)
  with open(ctx.path("prm", "standardizer.json"), "w") as f:
    json.dump({"features": list(features_lib.NAMES), **std.to_dict()}, f)
  k = splits["train"]["slate"].shape[1]
  pcfg = prm.PRMConfig(num_features=len(features_lib.NAMES), embed_dim=table.shape[1],
                       slate_size=k, dim=p.dim, num_layers=p.num_layers, num_heads=p.num_heads,
                       mlp_dim=p.mlp_dim, history=p.history)
  rows = {split: prm.rows(std(x[split]), splits[split], y[split], p.history) for split in x}
  model = prm.PRM(pcfg, rngs=nnx.Rngs(c.seed))
  ocfg = optim.OptimConfig(learning_rate=p.learning_rate, warmup_steps=p.warmup_steps,
                           total_steps=p.steps, weight_decay=p.weight_decay)
  tcfg = trainer_lib.TrainerConfig(num_steps=p.steps, log_every=p.log_every,
                                   eval_every=p.eval_every, checkpoint_every=p.checkpoint_every)
  tr = trainer_lib.Trainer(model, ocfg, tcfg, mesh=mesh_lib.data_parallel_mesh(p.num_devices),
                           workdir=ctx.path("prm"), name="rankers/prm",
                           objective=prm.objective(table, pcfg))
  val = splits["validation"]

  def eval_fn(params, step):
    del step
    s = prm.predict(tr.model(params), table, rows["validation"])
    per = tables.per_example(tables.order_by_scores(s), val)
    return {"R@1": float(np.mean(per["R@1"])), "N@3": float(np.mean(per["N@3"])),
            "loss": tr.evaluate_loss(params, rows["validation"], p.batch_size)}

  curve = []

  def recorded_eval(params, step):
    ev = eval_fn(params, step)
    curve.append({"step": step, **ev})
    return ev

  params, summary = tr.fit(tr.batches(rows["train"], p.batch_size, seed=c.seed),
                           eval_fn=recorded_eval)
  model = tr.model(params)
  report["prm"] = {"parameters": int(sum(v.size for v in
                                         jax.tree.leaves(nnx.state(model, nnx.Param)))),
                   "steps": p.steps, "resumed_from": summary["resumed_from"],
                   "slates_per_sec": summary.get("slates_per_sec"), "mfu": summary.get("mfu"),
                   "validation_curve": curve,
                   "train_seconds": summary["wall_seconds"]}
  return {split: prm.predict(model, table, rows[split]) for split in EVAL_SPLITS}


def run(ctx):
  c = ctx.section
  unknown = [r for r in c.rankers if r not in scores_lib.RANKERS]
  if unknown or not c.rankers:
    raise UserError(f"rankers.rankers must name some of {', '.join(scores_lib.RANKERS)}; got "
                    f"{tuple(c.rankers)}")
  data_dir, legacy_dir = ctx.inputs["data"], ctx.inputs["legacy"]
  splits = _load(legacy_dir, c)
  num_items = len(artifacts.load_items(data_dir))
  report = {"rankers": list(c.rankers), "slates": {s: int(len(v["slate"]))
                                                   for s, v in splits.items()},
            "seconds": {}}
  scores = {split: {} for split in EVAL_SPLITS}
  cf_cfg = cf.default_config()

  def timed(name, fn):
    t0 = time.time()
    out = fn()
    report["seconds"][name] = round(time.time() - t0, 1)
    logging.info("[rankers] %s done in %.1fs", name, report["seconds"][name])
    return out

  if "cf" in c.rankers:
    stats = cf_stats.load_stats(data_dir, c.window)
    for split in EVAL_SPLITS:
      s = splits[split]
      scores[split]["cf"] = cf.scores(stats, s["history"], s["slate"], cf_cfg)
  if "legacy_refreshed" in c.rankers:
    out = timed("legacy_refreshed", lambda: _refreshed_legacy(ctx, splits, num_items))
    for split in EVAL_SPLITS:
      scores[split]["legacy_refreshed"] = out[split]
  if {"lambdamart", "prm"} & set(c.rankers):
    def build():
      fb = features_lib.FeatureBuilder(data_dir, cf_cfg, c.recent_days, c.window)
      return {split: fb(s, leave_user_out=split == "train") for split, s in splits.items()}
    x = timed("features", build)
    y = {split: features_lib.labels(s, c.label) for split, s in splits.items()}
    const = features_lib.constant_features(x["train"])
    if const:
      logging.warning("[rankers] constant features on the training slates (no signal): %s",
                      ", ".join(const))
    report["constant_features"] = const
    no_pos = ~(y["train"] > 0).any(1)
    report["skipped_train_slates_without_positive"] = int(no_pos.sum())
    if no_pos.all():
      raise UserError(f"none of the {len(no_pos)} training slates has a positive "
                      f"({c.label}); the learned rankers have nothing to learn")
    if no_pos.any():
      logging.warning("[rankers] %d training slates have no positive label and are skipped",
                      int(no_pos.sum()))
    if "lambdamart" in c.rankers:
      keep = ~no_pos
      booster, info = timed("lambdamart", lambda: lambdamart.train(
          x["train"][keep], y["train"][keep], x["validation"], y["validation"], c.lambdamart,
          c.seed, ctx.out_dir))
      info["importances"] = lambdamart.importances(booster, top=10)
      report["lambdamart"] = info
      for split in EVAL_SPLITS:
        scores[split]["lambdamart"] = lambdamart.predict(booster, x[split])
    if "prm" in c.rankers:
      out = timed("prm", lambda: _train_prm(ctx, x, y, splits, report))
      for split in EVAL_SPLITS:
        scores[split]["prm"] = out[split]

  k = splits["test"]["slate"].shape[1]
  md, table_json = [], {}
  for split in EVAL_SPLITS:
    s = splits[split]
    scores_lib.save(ctx.out_dir, split, s["example_id"], scores[split])
    n = len(s["slate"])
    orders = {"legacy": np.tile(np.arange(k), (n, 1))}
    orders.update({r: tables.order_by_scores(scores[split][r]) for r in scores_lib.RANKERS
                   if r in scores[split]})
    rows = tables.evaluate(orders, s, n_boot=c.n_boot, seed=c.seed)
    table_json[split] = rows
    md.append(f"Re-rankers on all {n} {split} slates:\n\n" + tables.format_table(rows))
    report[split] = {name: {"R@1": r["R@1"]["mean"], "N@3": r["N@3"]["mean"],
                            "R@1_lift": r.get("lift", {}).get("R@1")} for name, r in rows.items()}
  with open(ctx.path("table.json"), "w") as f:
    json.dump(table_json, f, indent=2)
  with open(ctx.path("table.md"), "w") as f:
    f.write("\n\n".join(md) + "\n")
  with open(ctx.path("report.json"), "w") as f:
    json.dump(report, f, indent=2)
  logging.info("[rankers] tables:\n%s", "\n\n".join(md))
  return {split: report[split] for split in EVAL_SPLITS} | {"seconds": report["seconds"]}
