"""Integer ids, chronological order, the temporal split and the next-item examples.

The split is by global time: the earliest `period_fractions[0]` of interactions form the legacy
period (the only data the legacy ranker trains on), then the LLM training period, then
validation and test. Cut points are timestamps, so interactions that share a timestamp never
straddle two periods. An example is one interaction of the train, validation or test period:
its history is the user's strictly earlier interactions (any period, capped at `max_history`), its
further positives are the user's next interactions in the same period within a short window.
"""

import numpy as np
import pandas as pd

from gr2_jax.data import artifacts
from gr2_jax.errors import UserError

PAD = -1


def _item_record(i, row):
  year = row.year
  return {
      "id": i,
      "key": row.item,
      "title": row.title,
      "year": None if pd.isna(year) else int(year),
      "genres": list(row.genres),
      "description": row.description if isinstance(row.description, str) else "",
  }


def assign_ids(raw, max_users=0, min_user_interactions=1, seed=0, extra_items=()):
  """Keeps rated items (and `extra_items`: keys of the item file, e.g. items an impression log
  showed) and (optionally) a random subset of users; returns items, users, interactions
  (arrays sorted by user, timestamp, item)."""
  inter = raw.interactions.drop_duplicates(["user", "item", "timestamp"])
  counts = inter.groupby("user").size()
  keep_users = np.sort(counts[counts >= min_user_interactions].index.to_numpy())
  if max_users and len(keep_users) > max_users:
    rng = np.random.default_rng(seed)
    keep_users = np.sort(rng.choice(keep_users, size=max_users, replace=False))
  inter = inter[inter["user"].isin(set(keep_users))]
  if inter.empty:
    raise UserError("no interactions left after filtering users; lower min_user_interactions")
  item_keys = np.union1d(inter["item"].unique().astype(str),
                         np.asarray(list(extra_items), dtype=str))
  item_id = {k: i for i, k in enumerate(item_keys)}
  meta = raw.items.drop_duplicates("item").set_index("item").loc[item_keys].reset_index()
  items = [_item_record(i, row) for i, row in enumerate(meta.itertuples(index=False))]
  empty = [it["key"] for it in items if not it["title"].strip()]
  if empty:
    raise UserError(f"{len(empty)} item(s) have an empty title, e.g. {empty[0]!r}")
  user_keys = np.sort(inter["user"].unique())
  user_id = {k: i for i, k in enumerate(user_keys)}
  user_meta = raw.users.drop_duplicates("user").set_index("user") if len(raw.users) else None
  users = []
  for i, k in enumerate(user_keys):
    rec = {"id": i, "key": str(k), "age": -1, "gender": "", "occupation": -1}
    if user_meta is not None and k in user_meta.index:
      row = user_meta.loc[k]
      rec.update(age=int(row["age"]), gender=str(row["gender"]),
                 occupation=int(row["occupation"]))
    users.append(rec)
  arrays = {
      "user": inter["user"].map(user_id).to_numpy(np.int32),
      "item": inter["item"].map(item_id).to_numpy(np.int32),
      "timestamp": inter["timestamp"].to_numpy(np.int64),
      "rating": inter["rating"].to_numpy(np.float32),
  }
  order = np.lexsort((arrays["item"], arrays["timestamp"], arrays["user"]))
  arrays = {k: v[order] for k, v in arrays.items()}
  return items, users, arrays


def split_periods(timestamps, fractions):
  """Period index (0..3) of each interaction and the three cut timestamps.

  Period p holds timestamps in [cut[p-1], cut[p]); cuts are quantiles of the timestamps.
  """
  fractions = np.asarray(fractions, dtype=np.float64)
  if fractions.shape != (4,) or np.any(fractions <= 0) or abs(fractions.sum() - 1) > 1e-6:
    raise UserError(f"period_fractions must be 4 positive numbers summing to 1, got "
                    f"{tuple(fractions)}")
  qs = np.cumsum(fractions)[:3]
  cuts = np.quantile(np.sort(timestamps), qs, method="higher").astype(np.int64)
  cuts = np.maximum.accumulate(cuts)
  period = np.searchsorted(cuts, timestamps, side="right").astype(np.int8)
  return period, cuts


def build_examples(inter, max_history, min_history, window_items, window_seconds):
  """Next-item examples for every interaction of periods 1..3 (see module docstring).

  The history holds only interactions strictly earlier in time than the target: interactions
  that share the target's timestamp have no true order, and letting the tie-break order (item
  id) put some of them before the target would leak that order into the task.
  """
  user, item, ts, period = inter["user"], inter["item"], inter["timestamp"], inter["period"]
  n = len(user)
  starts = np.searchsorted(user, user, side="left")
  ends = np.searchsorted(user, user, side="right")
  # Interactions tied in time with each one: [tie_lo, tie_hi) in the sorted arrays.
  key = user.astype(np.int64) * (1 << 40) + (ts - ts.min())
  tie_lo_all = np.searchsorted(key, key, side="left")
  before = tie_lo_all - starts  # interactions strictly earlier in time
  sel = np.flatnonzero((period >= 1) & (before >= min_history))
  tie_lo = tie_lo_all[sel].astype(np.int64)
  tie_hi = np.searchsorted(key, key[sel], side="right").astype(np.int64)
  hist_len = np.minimum(before[sel], max_history).astype(np.int32)
  # Right-aligned histories: column L-1 is the most recent earlier interaction.
  idx = tie_lo[:, None] - max_history + np.arange(max_history)[None, :]
  valid = idx >= starts[sel][:, None]
  safe = np.where(valid, idx, 0)
  history = np.where(valid, item[safe], PAD).astype(np.int32)
  history_rating = np.where(valid, inter["rating"][safe], 0).astype(np.float32)
  # Further positives: the next interactions of the same user and period within the window.
  fidx = sel[:, None] + 1 + np.arange(window_items)[None, :]
  fsafe = np.minimum(fidx, n - 1)
  fvalid = ((fidx < ends[sel][:, None]) & (period[fsafe] == period[sel][:, None])
            & (ts[fsafe] - ts[sel][:, None] <= window_seconds))
  further = np.where(fvalid, item[fsafe], PAD).astype(np.int32)
  further_rating = np.where(fvalid, inter["rating"][fsafe], 0).astype(np.float32)
  return {
      "index": sel.astype(np.int64),
      "user": user[sel],
      "target": item[sel],
      "target_rating": inter["rating"][sel],
      "timestamp": ts[sel],
      "period": period[sel],
      "history": history,
      "history_rating": history_rating,
      "history_len": hist_len,
      "further": further,
      "further_rating": further_rating,
      "tie_lo": tie_lo,
      "tie_hi": tie_hi,
  }


def split_report(inter, examples, cuts):
  """Counts and time ranges per period, for the report and WORKSPACE.md."""
  report = {}
  for p, name in enumerate(artifacts.PERIODS):
    m = inter["period"] == p
    ts = inter["timestamp"][m]
    report[name] = {
        "interactions": int(m.sum()),
        "users": int(np.unique(inter["user"][m]).size),
        "examples": int((examples["period"] == p).sum()),
        "start": _date(ts.min()) if ts.size else None,
        "end": _date(ts.max()) if ts.size else None,
    }
  report["cuts"] = [_date(c) for c in cuts]
  return report


def _date(t):
  return pd.Timestamp(int(t), unit="s").strftime("%Y-%m-%d %H:%M:%S")


def save_examples(path, examples):
  np.savez(path, **examples)


def load_examples(path):
  with np.load(path) as z:
    return {k: z[k] for k in z.files}
