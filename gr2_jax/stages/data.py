"""Data stage: raw logs -> ids, chronological order, temporal split, next-item examples."""

import json
import time

from absl import logging

from gr2_jax.data import artifacts
from gr2_jax.data import preprocess
from gr2_jax.data import sources
from gr2_jax.errors import UserError


def load_raw(section):
  if section.source == "movielens-1m":
    return sources.load_movielens_1m()
  if section.source == "files":
    return sources.load_user_files(section.interactions_path, section.items_path,
                                   section.users_path)
  raise UserError(f"unknown data source {section.source!r}; valid: movielens-1m, files")


def run(ctx):
  c = ctx.section
  start = time.time()
  raw = load_raw(c)
  logging.info("[data] %s: %d interactions, %d items with metadata (%.1fs)", raw.name,
               len(raw.interactions), len(raw.items), time.time() - start)
  items, users, inter = preprocess.assign_ids(
      raw, max_users=c.max_users, min_user_interactions=c.min_user_interactions, seed=c.seed)
  inter["period"], cuts = preprocess.split_periods(inter["timestamp"], c.period_fractions)
  examples = preprocess.build_examples(
      inter, max_history=c.max_history, min_history=c.min_history,
      window_items=c.label_window_items, window_seconds=int(c.label_window_hours * 3600))
  report = {
      "source": raw.name,
      "users": len(users),
      "items": len(items),
      "interactions": int(inter["user"].size),
      "periods": preprocess.split_report(inter, examples, cuts),
  }
  if report["periods"]["test"]["examples"] == 0:
    raise UserError("the test period has no examples; use more data or change period_fractions")
  artifacts.save_items(ctx.out_dir, items)
  artifacts.save_users(ctx.out_dir, users)
  artifacts.save_interactions(ctx.out_dir, inter)
  preprocess.save_examples(ctx.path("examples.npz"), examples)
  with open(ctx.path("report.json"), "w") as f:
    json.dump(report, f, indent=2)
  for name in artifacts.PERIODS:
    p = report["periods"][name]
    logging.info("[data] %-10s %s .. %s  interactions %7d  users %5d  examples %7d", name,
                 p["start"], p["end"], p["interactions"], p["users"], p["examples"])
  return report
