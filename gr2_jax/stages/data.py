"""Data stage: raw logs -> ids, chronological order, temporal split, next-item examples.

With `source=impressions` it also builds the slates (the served lists) into `tfds/`, in memory
or with Apache Beam (`beam_runner`); the legacy stage then only passes them on.
"""

import json
import time

import numpy as np
import pandas as pd
from absl import logging

from gr2_jax.data import artifacts
from gr2_jax.data import impressions
from gr2_jax.data import preprocess
from gr2_jax.data import slates as slates_lib
from gr2_jax.data import sources
from gr2_jax.errors import UserError

SOURCES = ("movielens-1m", "files", "impressions")


def load_raw(section):
  if section.source == "movielens-1m":
    return sources.load_movielens_1m()
  if section.source == "files":
    return sources.load_user_files(section.interactions_path, section.items_path,
                                   section.users_path)
  raise UserError(f"unknown data source {section.source!r}; valid: {', '.join(SOURCES)}")


def run(ctx):
  c = ctx.section
  if c.source == "impressions":
    return _run_impressions(ctx, c)
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
  _save(ctx, items, users, inter, examples, report)
  for name in artifacts.PERIODS:
    p = report["periods"][name]
    logging.info("[data] %-10s %s .. %s  interactions %7d  users %5d  examples %7d", name,
                 p["start"], p["end"], p["interactions"], p["users"], p["examples"])
  return report


def _save(ctx, items, users, inter, examples, report):
  artifacts.save_items(ctx.out_dir, items)
  artifacts.save_users(ctx.out_dir, users)
  artifacts.save_interactions(ctx.out_dir, inter)
  preprocess.save_examples(ctx.path("examples.npz"), examples)
  with open(ctx.path("report.json"), "w") as f:
    json.dump(report, f, indent=2)


def _run_impressions(ctx, c):
  """The impression log -> the data artifact (events as interactions) and the slates."""
  if c.beam_runner and c.interactions_path:
    raise UserError("data.interactions_path (histories from a separate file) is read by the "
                    "in-memory path only; unset data.beam_runner or data.interactions_path")
  start = time.time()
  rows, user_keys, item_keys, info = impressions.read_log(c.impressions_path, c.chunk_rows)
  read_seconds = time.time() - start
  logging.info("[data] impressions %s: %d rows, %d users, %d items (%.1fs, %.0f rows/s)",
               c.impressions_path, info["rows"], len(user_keys), len(item_keys), read_seconds,
               info["rows"] / max(read_seconds, 1e-9))
  item_frame = sources.read_items(c.items_path)
  known = np.isin(item_keys.astype(str), item_frame["item"].to_numpy(str))
  rows["item"] = np.where(known[rows["item"]], rows["item"], -1)
  rows = impressions.sort_rows(rows)  # grouped by request from here on (masks keep it so)
  if c.interactions_path:
    events = sources.load_user_files(c.interactions_path, c.items_path).interactions
  else:
    ev = impressions.positive_events(rows)
    events = pd.DataFrame({"user": user_keys[ev["user"]].astype(str),
                           "item": item_keys[ev["item"]].astype(str),
                           "timestamp": ev["timestamp"], "rating": ev["rating"]})
  if events.empty:
    raise UserError(f"impressions file {c.impressions_path} has no positive event in a sound "
                    "request (label > 0); nothing to build histories from")
  raw = sources.RawData(events, item_frame, sources.read_users(c.users_path), "impressions")
  items, users, inter = preprocess.assign_ids(
      raw, max_users=c.max_users, min_user_interactions=c.min_user_interactions, seed=c.seed,
      extra_items=item_keys[known])
  inter["period"], cuts = preprocess.split_periods(inter["timestamp"], c.period_fractions)
  examples = preprocess.build_examples(
      inter, max_history=c.max_history, min_history=c.min_history,
      window_items=c.label_window_items, window_seconds=int(c.label_window_hours * 3600))
  user_index = {u["key"]: u["id"] for u in users}
  item_index = {it["key"]: it["id"] for it in items}
  uid = np.array([user_index.get(k, -1) for k in user_keys.astype(str)], np.int64)[rows["user"]]
  iid = np.array([item_index.get(k, -1) for k in item_keys.astype(str)], np.int64)
  rows["user"] = uid
  rows["item"] = np.where(rows["item"] >= 0, iid[np.maximum(rows["item"], 0)], -1)
  left_out = uid < 0
  rows = {k: v[~left_out] for k, v in rows.items()}
  k = impressions.slate_size_of(rows, c.slate_size)
  if k < 2 or k >= len(items):
    raise UserError(f"slate size {k} (data.slate_size={c.slate_size}; 0 = the log's most "
                    f"common list length) must be in [2, {len(items) - 1}]")
  start = time.time()
  if c.beam_runner:
    plan = impressions.BeamPlan(
        c.impressions_path, tuple(impressions.log_columns(c.impressions_path)), user_index,
        item_index, k, tuple(int(x) for x in cuts), c.max_history, c.min_history)
    counts = impressions.build_with_beam(plan, ctx.path("tfds"), c.beam_runner, c.beam_options)
  else:
    records, counts = impressions.build_slates(
        rows, slate_size=k, cuts=cuts, max_history=c.max_history, min_history=c.min_history,
        events=inter if c.interactions_path else None)
    counts["user_left_out_rows"] = int(left_out.sum())
    if counts["slates"]:
      slates_lib.write(ctx.path("tfds"), records, k)
  build_seconds = time.time() - start
  counts = {name: int(counts.get(name, 0)) for name in
            ("requests", "slates", "cut", "user_left_out_rows") + impressions.DROP_KINDS}
  for name in ("user_left_out_rows",) + impressions.DROP_KINDS:
    if counts[name]:
      what = "rows" if name == "user_left_out_rows" else "requests"
      logging.warning("[data] dropped %d %s: %s", counts[name], what, _DROP_HELP[name])
  if counts["cut"]:
    logging.info("[data] %d served lists longer than K=%d cut to their first %d", counts["cut"],
                 k, k)
  if not counts["slates"]:
    raise UserError(f"no usable slate in {c.impressions_path}: {counts['requests']} requests, "
                    + ", ".join(f"{n} {v}" for n, v in counts.items()
                                if n in impressions.DROP_KINDS and v))
  per_split = slates_lib.split_sizes(ctx.path("tfds"))
  if not per_split.get("test"):
    raise UserError("the test period has no slates; use more data or change period_fractions")
  report = {
      "source": "impressions",
      "users": len(users),
      "items": len(items),
      "interactions": int(inter["user"].size),
      "periods": preprocess.split_report(inter, examples, cuts),
      "slates": {"slate_size": k, "path": "beam" if c.beam_runner else "in-memory",
                 "rows": info["rows"], "read_seconds": round(read_seconds, 2),
                 "build_seconds": round(build_seconds, 2),
                 "rows_per_second": round(info["rows"] / max(read_seconds + build_seconds, 1e-9)),
                 "per_split": per_split, "counts": counts},
  }
  _save(ctx, items, users, inter, examples, report)
  logging.info("[data] slates (K=%d, %s): %s of %d requests; built in %.1fs", k,
               report["slates"]["path"], per_split, counts["requests"], build_seconds)
  return report


_DROP_HELP = {
    "user_left_out_rows": "users left out (data.max_users, data.min_user_interactions)",
    "unknown_item": "an item missing from the item file",
    "non_numeric": "a label, position or timestamp that is not a number",
    "duplicate_position": "two rows at the same position",
    "timestamp_order": "timestamps out of order along the served list",
    "short_list": "fewer rows than K (data.slate_size)",
    "no_positive": "no positive (label > 0) among the first K",
    "legacy_period": "served in the legacy period (their positives feed histories only)",
    "short_history": "fewer earlier positives than data.min_history",
}
