"""Impression logs: the funnel's served lists as the re-ranker's slates.

A log has one row per shown item: `request_id, user, timestamp, position, item, label[, grade]`
(Parquet, CSV or TSV; timestamps in seconds since the epoch). A request's rows are the list the
legacy stack served, in served order; `label > 0` marks a positive (click, watch, purchase) and
the optional integer `grade` a graded one (else every positive has grade 1).

The slates are built per user by `build_slates`, which needs only one user's rows at a time:
the in-memory path calls it once on the whole log, the Beam path (`gr2_jax.data.slates_beam`)
once per user after a GroupByKey, so both give the same records. A user's history before a
request is their positive events strictly earlier than the request, from the log itself.

Requests are checked in this order and dropped (counted per kind) at the first failure:
unknown_item (an item missing from the item file), non_numeric (label, position or timestamp
not a number, or a timestamp outside [0, 2^33)), duplicate_position, timestamp_order (timestamps
decreasing along the served order), short_list (fewer than K rows; longer lists are cut to K),
no_positive (no positive among the first K), legacy_period (served before the first cut: those
only feed histories), short_history (fewer than min_history earlier positives). Positives of
requests that pass the first four checks are the user's events (histories, interactions.npz).
"""

import dataclasses
import hashlib
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import tempfile

import numpy as np
import pandas as pd

from gr2_jax.data import sources
from gr2_jax.errors import UserError

LOG_COLUMNS = ("request_id", "user", "timestamp", "position", "item", "label")
OPTIONAL_COLUMNS = ("grade",)
INTEGRITY_KINDS = ("unknown_item", "non_numeric", "duplicate_position", "timestamp_order")
DROP_KINDS = INTEGRITY_KINDS + ("short_list", "no_positive", "legacy_period", "short_history")
SPLIT_OF_PERIOD = {1: "train", 2: "validation", 3: "test"}
MAX_TIMESTAMP = 1 << 33  # seconds; keys pack (user, timestamp) into one int64
PAD = -1


def request_hash(request_id, user):
  """The example id of a request: 63 bits of blake2b of (request id, user) (stable across runs,
  machines and the in-memory and Beam paths). A request id shared by two users' rows makes two
  requests."""
  digest = hashlib.blake2b(f"{request_id}\x1f{user}".encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") >> 1


def _hashes(request_ids, users):
  pairs = pd.MultiIndex.from_arrays([request_ids, users])
  inv, uniq = pd.factorize(pairs)
  return np.fromiter((request_hash(r, u) for r, u in uniq), np.int64, len(uniq))[inv]


def _to_number(series):
  return pd.to_numeric(series, errors="coerce").to_numpy(np.float64)


def _chunks(path, columns, chunk_rows):
  """DataFrames of `columns` (strings for text files) of at most chunk_rows rows."""
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    f = pq.ParquetFile(path)
    have = set(f.schema_arrow.names)
    for batch in f.iter_batches(batch_size=chunk_rows, columns=[c for c in columns if c in have]):
      yield batch.to_pandas()
  else:
    yield from pd.read_csv(path, sep="\t" if path.endswith(".tsv") else ",", dtype=str,
                           keep_default_na=False, chunksize=chunk_rows)


def _header(path, sep):
  if sep is None:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    return list(pq.ParquetFile(path).schema_arrow.names)
  return list(pd.read_csv(path, sep=sep, nrows=0).columns)


def log_columns(path):
  """The header of a log file (checked before any reading)."""
  names = sources.read_file(path, "impressions", _header)
  missing = [c for c in LOG_COLUMNS if c not in names]
  if missing:
    raise UserError(f"impressions file {path} lacks column(s) {', '.join(missing)}; it has "
                    f"{', '.join(names)}")
  return names


class KeyTable:
  """String keys -> dense codes, in order of first appearance, across chunks."""

  def __init__(self):
    self.index = {}

  def codes(self, keys):
    inv, uniq = pd.factorize(keys)
    ids = np.fromiter((self.index.setdefault(k, len(self.index)) for k in uniq), np.int64,
                      len(uniq))
    return ids[inv]

  def keys(self):
    return np.array(list(self.index), dtype=object)


def read_log(path, chunk_rows=1_000_000):
  """Reads a log in chunks into compact columns: request (example id), user and item (codes
  into `user_keys` / `item_keys`), timestamp, position (int64; -1 where not a number), label
  (float32; NaN where not a number), grade (int8; -1 where absent). Returns (rows, user_keys,
  item_keys, info)."""
  names = log_columns(path)
  has_grade = "grade" in names
  users, items = KeyTable(), KeyTable()
  parts, n_rows, label_ok = [], 0, 0
  first_bad_label = None
  try:
    for frame in _chunks(path, LOG_COLUMNS + OPTIONAL_COLUMNS, chunk_rows):
      label = _to_number(frame["label"])
      ts = _to_number(frame["timestamp"])
      pos = _to_number(frame["position"])
      bad_label = np.isnan(label)
      label_ok += int((~bad_label).sum())
      if first_bad_label is None and bad_label.any():
        first_bad_label = frame["label"].iloc[int(np.flatnonzero(bad_label)[0])]
      ts_bad = np.isnan(ts) | (ts < 0) | (ts >= MAX_TIMESTAMP)
      pos_bad = np.isnan(pos) | (pos < 0)
      grade = (np.nan_to_num(_to_number(frame["grade"]), nan=-1).clip(-1, 127) if has_grade
               else np.full(len(frame), -1))
      user_keys = frame["user"].astype(str).to_numpy()
      parts.append({
          "request": _hashes(frame["request_id"].astype(str).to_numpy(), user_keys),
          "user": users.codes(user_keys),
          "item": items.codes(frame["item"].astype(str).to_numpy()),
          "timestamp": np.where(ts_bad, -1, np.nan_to_num(ts)).astype(np.int64),
          "position": np.where(pos_bad, -1, np.nan_to_num(pos)).astype(np.int64),
          "label": label.astype(np.float32),
          "grade": grade.astype(np.int8),
      })
      n_rows += len(frame)
  except UserError:
    raise
  except Exception as e:  # a file that breaks part-way
    raise UserError(f"impressions file {path} could not be read after {n_rows} rows: "
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
  if n_rows == 0:
    raise UserError(f"impressions file {path} is empty")
  if label_ok == 0:
    raise UserError(f"impressions file {path}: the label column is not numeric "
                    f"(e.g. {first_bad_label!r})")
  rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  return rows, users.keys(), items.keys(), {"rows": n_rows, "has_grade": has_grade}


def _segments(request):
  """Start offsets of each run of equal values (rows already grouped by request)."""
  if not request.size:
    return np.zeros(0, np.int64)
  return np.flatnonzero(np.concatenate([[True], request[1:] != request[:-1]]))


def _any_per_group(flags, starts):
  return np.logical_or.reduceat(flags, starts) if starts.size else np.zeros(0, bool)


def sort_rows(rows):
  """Rows grouped by request, requests by (user, first timestamp, id), rows by position."""
  ts0 = pd.Series(rows["timestamp"]).groupby(rows["request"]).transform("min").to_numpy()
  order = np.lexsort((rows["position"], rows["request"], ts0, rows["user"]))
  return {k: v[order] for k, v in rows.items()}


def integrity(rows):
  """Per request (rows sorted by `sort_rows`): start offsets, sizes, and the first integrity
  kind that fails (index into INTEGRITY_KINDS; -1 = sound)."""
  starts = _segments(rows["request"])
  n = len(rows["request"])
  sizes = np.diff(np.append(starts, n))
  same = np.concatenate([[False], rows["request"][1:] == rows["request"][:-1]])
  checks = [
      rows["item"] < 0,
      np.isnan(rows["label"]) | (rows["position"] < 0) | (rows["timestamp"] < 0),
      same & (np.diff(rows["position"], prepend=-1) == 0),
      same & (np.diff(rows["timestamp"], prepend=0) < 0),
  ]
  kind = np.full(starts.size, -1, np.int64)
  for i in range(len(checks) - 1, -1, -1):
    kind = np.where(_any_per_group(checks[i], starts), i, kind)
  return starts, sizes, kind


def rating_of(grade, label):
  """A positive's rating: its grade (at least 1) when the log has grades, else its label."""
  return np.where(grade >= 0, np.maximum(grade, 1).astype(np.float32), label).astype(np.float32)


def positive_events(rows, starts=None, sizes=None, kind=None):
  """The positives of sound requests (rows grouped by request, as `sort_rows` leaves them) as
  events: user, item, timestamp, rating (`rating_of`), sorted by (user, timestamp, item),
  duplicates dropped."""
  if starts is None:
    starts, sizes, kind = integrity(rows)
  sound = np.repeat(kind < 0, sizes)
  m = sound & (rows["label"] > 0)
  rating = rating_of(rows["grade"], rows["label"])
  ev = {"user": rows["user"][m], "item": rows["item"][m], "timestamp": rows["timestamp"][m],
        "rating": rating[m].astype(np.float32)}
  order = np.lexsort((ev["item"], ev["timestamp"], ev["user"]))
  ev = {k: v[order] for k, v in ev.items()}
  if ev["user"].size:
    keep = np.concatenate([[True], (np.diff(ev["user"]) != 0) | (np.diff(ev["timestamp"]) != 0)
                           | (np.diff(ev["item"]) != 0)])
    ev = {k: v[keep] for k, v in ev.items()}
  return ev


def build_slates(rows, *, slate_size, cuts, max_history, min_history, events=None):
  """Slate records of the requests in `rows` (every request of each user present, any order).

  Returns ({split: records}, counts): records as the slates builder takes them (history
  right-aligned in `max_history` columns, -1 = pad), counts per drop kind plus "requests",
  "slates" and "cut" (lists longer than K). `events` (from `positive_events` on the same users,
  or the user's interactions file) default to this log's own."""
  k = int(slate_size)
  rows = sort_rows(rows)
  starts, sizes, kind = integrity(rows)
  if events is None:
    events = positive_events(rows, starts, sizes, kind)
  counts = {name: 0 for name in DROP_KINDS}
  counts["requests"] = int(starts.size)
  for i, name in enumerate(INTEGRITY_KINDS):
    counts[name] = int((kind == i).sum())
  sound = kind < 0
  short = sound & (sizes < k)
  counts["short_list"] = int(short.sum())
  ok = sound & ~short
  counts["cut"] = int((ok & (sizes > k)).sum())
  # The first K rows of each remaining request.
  req = np.flatnonzero(ok)
  idx = starts[req][:, None] + np.arange(k)[None, :]  # [R, K]
  label = rows["label"][idx]
  positive = label > 0
  has_pos = positive.any(1)
  counts["no_positive"] = int((~has_pos).sum())
  req, idx, label, positive = req[has_pos], idx[has_pos], label[has_pos], positive[has_pos]
  ts0 = rows["timestamp"][idx[:, 0]]
  period = np.searchsorted(np.asarray(cuts, np.int64), ts0, side="right").astype(np.int8)
  counts["legacy_period"] = int((period == 0).sum())
  keep = period >= 1
  req, idx, label, positive, ts0, period = (a[keep] for a in (req, idx, label, positive, ts0,
                                                                period))
  user = rows["user"][idx[:, 0]]
  # Histories: the user's events strictly before the request.
  ev_key = events["user"].astype(np.int64) * MAX_TIMESTAMP + events["timestamp"]
  first_ev = np.searchsorted(ev_key, user.astype(np.int64) * MAX_TIMESTAMP, side="left")
  end_ev = np.searchsorted(ev_key, user.astype(np.int64) * MAX_TIMESTAMP + ts0, side="left")
  n_hist = end_ev - first_ev
  enough = n_hist >= min_history
  counts["short_history"] = int((~enough).sum())
  req, idx, label, positive, ts0, period, user, first_ev, end_ev, n_hist = (
      a[enough] for a in (req, idx, label, positive, ts0, period, user, first_ev, end_ev, n_hist))
  hist_len = np.minimum(n_hist, max_history).astype(np.int32)
  hidx = end_ev[:, None] - max_history + np.arange(max_history)[None, :]
  hvalid = hidx >= first_ev[:, None]
  hsafe = np.where(hvalid, hidx, 0)
  history = np.where(hvalid, events["item"][hsafe] if events["item"].size else PAD, PAD)
  history_rating = np.where(hvalid, events["rating"][hsafe] if events["item"].size else 0, 0)
  grade = rows["grade"][idx].astype(np.int64)
  grades = np.where(positive, np.maximum(grade, 1), 0).clip(0, 127).astype(np.int8)
  target_index = np.argmax(grades, axis=1).astype(np.int32)  # highest grade, first shown
  slate = rows["item"][idx].astype(np.int32)
  rating = rating_of(grade, label)
  target = np.take_along_axis(slate, target_index[:, None], 1)[:, 0]
  target_rating = np.take_along_axis(rating, target_index[:, None], 1)[:, 0]
  records = {}
  for p, split in SPLIT_OF_PERIOD.items():
    m = period == p
    r = {
        "example_id": rows["request"][idx[m, 0]].astype(np.int64),
        "user": user[m].astype(np.int32),
        "timestamp": ts0[m].astype(np.int64),
        "history": history[m].astype(np.int32),
        "history_rating": history_rating[m].astype(np.float32),
        "history_len": hist_len[m],
        "target": target[m].astype(np.int32),
        "target_rating": target_rating[m].astype(np.float32),
        "target_index": target_index[m],
        "slate": slate[m],
        "slate_scores": np.tile(np.arange(k, 0, -1, dtype=np.float32), (int(m.sum()), 1)),
        "labels": positive[m].astype(np.int8),
        "grades": grades[m],
    }
    order = np.argsort(r["example_id"], kind="stable")
    records[split] = {key: v[order] for key, v in r.items()}
  counts["slates"] = int(len(req))
  return records, counts


def slate_size_of(rows, slate_size):
  """K: the configured one, or (0) the most common served-list length of sound requests (rows
  grouped by request, as `sort_rows` leaves them)."""
  if slate_size:
    return int(slate_size)
  _, sizes, kind = integrity(rows)
  sound = sizes[kind < 0]
  if not sound.size:
    raise UserError("no usable request in the impressions log (every request failed a check)")
  return int(np.bincount(sound).argmax())


@dataclasses.dataclass(frozen=True)
class BeamPlan:
  """What the Beam build (`gr2_jax.data.slates_beam`) needs: the log, the id tables, K, the
  cuts and the history sizes."""
  path: str
  columns: tuple
  user_index: dict
  item_index: dict
  slate_size: int
  cuts: tuple
  max_history: int
  min_history: int


def build_with_beam(plan, out_dir, runner, options=""):
  """Runs the Beam build in a child process (Beam and gRPC stay out of this JAX process);
  returns its drop counts. Its output streams to this process's stderr; a failure is one
  UserError with the child's last error line."""
  if importlib.util.find_spec("apache_beam") is None:
    raise UserError(f"data.beam_runner={runner!r} needs Apache Beam: pip install "
                    "'gr2_jax[beam]'")
  with tempfile.TemporaryDirectory(prefix="gr2_beam_") as tmp:
    plan_path = os.path.join(tmp, "plan.pkl")
    counts_path = os.path.join(tmp, "counts.json")
    with open(plan_path, "wb") as f:
      pickle.dump(plan, f)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-m", "gr2_jax.data.slates_beam", plan_path, out_dir,
                           runner, options, counts_path], env=env, stdout=sys.stderr,
                          stderr=subprocess.PIPE, text=True, check=False)
    if proc.returncode:
      lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
      sys.stderr.write(proc.stderr[-5000:])
      raise UserError(f"the Beam build ({runner}) failed: {lines[-1] if lines else proc.returncode}")
    with open(counts_path) as f:
      return json.load(f)
