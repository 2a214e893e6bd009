"""Impression logs: slates built from served lists, by hand-checked example, and the synthetic
log's known biases."""

import numpy as np
import pandas as pd
import pytest

from gr2_jax.data import impressions
from gr2_jax.data import synthetic
from gr2_jax.errors import UserError

# (request, user, timestamp, [items], [labels], [grades]); K = 3, cuts (100, 200, 300).
NAN = float("nan")
LOG = [
    ("A", 0, 50, [1, 2, 3], [1, 0, 0], [2, 0, 0]),  # legacy period; its positive is history
    ("B", 0, 150, [4, 5, 6, 7], [0, 1, 1, 0], [0, 1, 2, 0]),  # cut to 3; target item 6
    ("C", 0, 250, [8, 9, 10], [0, 0, 0], [0, 0, 0]),  # no positive
    ("D", 0, 350, [1, 5, 9], [0, 0, 1], [0, 0, 0]),  # positive with grade 0 -> grade 1
    ("E", 1, 160, [1, 2, 3], [1, 0, 0], [1, 0, 0]),  # duplicate position (set below)
    ("F", 1, 170, [2, -1, 3], [1, 0, 0], [1, 0, 0]),  # unknown item
    ("G", 1, 180, [2, 3, 4], [NAN, 1, 0], [0, 1, 0]),  # label not a number
    ("H", 1, 190, [2, 3, 4], [1, 0, 0], [1, 0, 0]),  # timestamps out of order (set below)
    ("I", 1, 260, [2, 3], [1, 0], [1, 0]),  # short list, still sound: its positive is history
    ("J", 1, 270, [4, 5, 6], [1, 0, 0], [1, 0, 0]),  # validation slate, history [3, 2]
    ("K", 1, 120, [1, 2, 3], [0, 0, 1], [0, 0, 1]),  # no earlier positive: short history
]
CUTS = (100, 200, 300)


def _rows(log=LOG):
  out = {k: [] for k in ("request", "user", "item", "timestamp", "position", "label", "grade")}
  for req, user, ts, items, labels, grades in log:
    for p, (i, l, g) in enumerate(zip(items, labels, grades)):
      out["request"].append(impressions.request_hash(req, f"u{user}"))
      out["user"].append(user)
      out["item"].append(i)
      out["timestamp"].append(ts + (-10 if req == "H" and p == 1 else 0))
      out["position"].append(0 if req == "E" and p == 1 else p)
      out["label"].append(l)
      out["grade"].append(g)
  types = {"label": np.float32, "grade": np.int8}
  rows = {k: np.asarray(v, types.get(k, np.int64)) for k, v in out.items()}
  perm = np.random.default_rng(0).permutation(len(rows["user"]))  # any row order
  return {k: v[perm] for k, v in rows.items()}


def test_build_slates_by_hand():
  records, counts = impressions.build_slates(_rows(), slate_size=3, cuts=CUTS, max_history=2,
                                             min_history=1)
  assert counts == {"requests": 11, "slates": 3, "cut": 1, "unknown_item": 1, "non_numeric": 1,
                    "duplicate_position": 1, "timestamp_order": 1, "short_list": 1,
                    "no_positive": 1, "legacy_period": 1, "short_history": 1}
  tr, va, te = records["train"], records["validation"], records["test"]
  assert [len(r["example_id"]) for r in (tr, va, te)] == [1, 1, 1]
  # B: history [1] (A's positive, grade 2); slate cut to 4 5 6; target 6 (grade 2 beats 1).
  assert tr["example_id"][0] == impressions.request_hash("B", "u0")
  assert tr["history_len"][0] == 1 and tr["history"][0].tolist() == [-1, 1]
  assert tr["history_rating"][0].tolist() == [0, 2]
  assert tr["slate"][0].tolist() == [4, 5, 6]
  assert tr["labels"][0].tolist() == [0, 1, 1] and tr["grades"][0].tolist() == [0, 1, 2]
  assert tr["target_index"][0] == 2 and tr["target"][0] == 6 and tr["target_rating"][0] == 2
  assert tr["timestamp"][0] == 150 and tr["user"][0] == 0
  assert tr["slate_scores"][0].tolist() == [3, 2, 1]
  # J: K's positive (item 3, t=120) and I's (item 2, t=260); E..H were unsound.
  assert va["example_id"][0] == impressions.request_hash("J", "u1")
  assert va["history"][0].tolist() == [3, 2] and va["target_index"][0] == 0
  # D: the last two of [1, 5, 6]; a positive with grade 0 counts as grade 1.
  assert te["history"][0].tolist() == [5, 6] and te["history_rating"][0].tolist() == [1, 2]
  assert te["grades"][0].tolist() == [0, 0, 1] and te["target_index"][0] == 2


def test_per_user_calls_equal_one_call():
  """What the Beam path relies on: slates of each user's rows alone are the whole log's."""
  rows = _rows()
  whole, whole_counts = impressions.build_slates(rows, slate_size=3, cuts=CUTS, max_history=2,
                                                 min_history=1)
  parts, total = [], {}
  for u in np.unique(rows["user"]):
    m = rows["user"] == u
    rec, counts = impressions.build_slates({k: v[m] for k, v in rows.items()}, slate_size=3,
                                           cuts=CUTS, max_history=2, min_history=1)
    parts.append(rec)
    for k, v in counts.items():
      total[k] = total.get(k, 0) + v
  assert total == whole_counts
  for split, r in whole.items():
    merged = {k: np.concatenate([p[split][k] for p in parts]) for k in r}
    order = np.argsort(merged["example_id"])
    for k, v in r.items():
      np.testing.assert_array_equal(merged[k][order], v, err_msg=f"{split}/{k}")


def test_slate_size_from_the_log():
  rows = impressions.sort_rows(_rows())  # grouped by request, as the data stage passes them
  assert impressions.slate_size_of(rows, 0) == 3  # sound requests: 3 x 3 rows... and B (4)
  assert impressions.slate_size_of(_rows(), 5) == 5


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv"])
def test_read_log_chunks_and_formats(tmp_path, fmt):
  frame, _ = synthetic.generate(num_users=20, num_items=50, requests_per_user=5, seed=3)
  if fmt == "parquet":
    frame.loc[7, "label"] = np.nan
  else:
    frame["label"] = frame["label"].astype(object)
    frame.loc[7, "label"] = "x"
  path = str(tmp_path / f"log.{fmt}")
  if fmt == "parquet":
    frame.to_parquet(path, row_group_size=64)
  else:
    frame.to_csv(path, sep="\t" if fmt == "tsv" else ",", index=False)
  a, ua, ia, info = impressions.read_log(path, chunk_rows=37)
  b, ub, ib, _ = impressions.read_log(path, chunk_rows=10_000)
  assert info == {"rows": len(frame), "has_grade": True}
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert list(ua) == list(ub) and list(ia) == list(ib)
  assert np.isnan(a["label"][7]) and np.isnan(a["label"]).sum() == 1
  np.testing.assert_array_equal(ua[a["user"]], frame["user"].astype(str).to_numpy())
  np.testing.assert_array_equal(ia[a["item"]], frame["item"].astype(str).to_numpy())
  np.testing.assert_array_equal(a["timestamp"], frame["timestamp"].to_numpy())
  want = [impressions.request_hash(r, u) for r, u in zip(frame["request_id"], frame["user"])]
  np.testing.assert_array_equal(a["request"], want)


def test_read_log_errors(tmp_path):
  with pytest.raises(UserError, match="lacks column"):
    p = tmp_path / "a.csv"
    pd.DataFrame({"request_id": [1], "user": [1], "item": [1]}).to_csv(p, index=False)
    impressions.read_log(str(p))
  with pytest.raises(UserError, match="label column is not numeric.*'click'"):
    p = tmp_path / "b.csv"
    pd.DataFrame({"request_id": [1, 1], "user": [1, 1], "timestamp": [5, 5], "position": [0, 1],
                  "item": [1, 2], "label": ["click", "skip"]}).to_csv(p, index=False)
    impressions.read_log(str(p))
  with pytest.raises(UserError, match="does not exist"):
    impressions.read_log(str(tmp_path / "none.parquet"))
  with pytest.raises(UserError, match="unsupported format"):
    (tmp_path / "c.json").write_text("{}")
    impressions.read_log(str(tmp_path / "c.json"))
  with pytest.raises(UserError, match="could not be read"):
    (tmp_path / "d.parquet").write_bytes(b"PAR1 not really")
    impressions.read_log(str(tmp_path / "d.parquet"))


def test_synthetic_log_position_bias_and_learnable_signal():
  """Clicks fall with position; the history (earlier clicks' genres) predicts the clicked item
  better than the legacy order, and the generator's true relevance better still."""
  frame, world = synthetic.generate(num_users=400, num_items=300, requests_per_user=30, seed=0)
  ctr = frame.groupby("position")["label"].mean().to_numpy()
  assert ctr[0] > 1.5 * ctr[2] > 0 and ctr[2] > ctr[9]
  rows = {
      "request": np.array([impressions.request_hash(r, u) for r, u in
                           zip(frame["request_id"], frame["user"])], np.int64),
      "user": frame["user"].str[1:].astype(int).to_numpy(np.int64),
      "item": frame["item"].str[1:].astype(int).to_numpy(np.int64),
      "timestamp": frame["timestamp"].to_numpy(np.int64),
      "position": frame["position"].to_numpy(np.int64),
      "label": frame["label"].to_numpy(np.float32),
      "grade": frame["grade"].to_numpy(np.int8),
  }
  cuts = tuple(np.quantile(frame["timestamp"], [0.4, 0.7, 0.85]).astype(np.int64))
  records, _ = impressions.build_slates(rows, slate_size=10, cuts=cuts, max_history=50,
                                        min_history=3)
  s = {k: np.concatenate([records[sp][k] for sp in records]) for k in records["train"]}
  n = len(s["target_index"])
  assert n > 500
  hits = lambda order: float((order == s["target_index"]).mean())  # noqa: E731
  legacy = hits(np.zeros(n, int))
  genres = world.item_genres
  profile = np.stack([genres[h[h >= 0]].sum(0) for h in s["history"]])  # [N, G]
  by_history = np.einsum("ng,nkg->nk", profile, genres[s["slate"]])
  by_history = np.argmax(by_history - 1e-6 * np.arange(10), axis=1)  # ties: legacy order
  oracle = np.argmax(synthetic.true_relevance(world, s["user"], s["slate"]), axis=1)
  assert legacy < hits(by_history) < hits(oracle), (legacy, hits(by_history), hits(oracle))
  assert hits(by_history) - legacy > 0.05
