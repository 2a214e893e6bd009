"""Tests of item text, the embedding cache, user-supplied and collaborative embeddings."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gr2_jax.errors import UserError
from gr2_jax.sids import embeddings as emb_lib

TOY = {"id": 0, "key": "Toy Story (1995)", "title": "Toy Story", "year": 1995,
       "genres": ["Animation", "Comedy"], "description": ""}


def test_item_text_fields_and_template():
  assert emb_lib.item_text(TOY) == "Toy Story (1995). Genres: Animation, Comedy"
  assert emb_lib.item_text(TOY, ("title",)) == "Toy Story"
  assert emb_lib.item_text(dict(TOY, year=None, description="Toys live."),
                           ("title", "year", "description")) == "Toy Story. Description: Toys live."
  assert emb_lib.item_text(TOY, template="{title} [{genres}]") == "Toy Story [Animation, Comedy]"
  with pytest.raises(UserError, match="plot"):
    emb_lib.item_text(TOY, ("title", "plot"))


def test_empty_item_text_is_user_error():
  with pytest.raises(UserError, match="empty text"):
    emb_lib.item_texts([TOY, dict(TOY, id=1, title="", year=None, genres=[])])


def test_cache_encodes_each_text_once(tmp_path):
  calls = []

  def encode(texts):
    calls.append(list(texts))
    return np.array([[len(t), 1.0] for t in texts], np.float32)

  out = emb_lib.encode_items_cached(["ab", "c", "ab"], encode, "fake", str(tmp_path))
  np.testing.assert_array_equal(out, [[2, 1], [1, 1], [2, 1]])
  assert calls == [["ab", "c"]]
  out = emb_lib.encode_items_cached(["c", "def"], encode, "fake", str(tmp_path))
  np.testing.assert_array_equal(out, [[1, 1], [3, 1]])
  assert calls[1] == ["def"]  # "c" came from the cache


def test_user_embeddings_npy_and_parquet(tmp_path):
  items = [dict(TOY, id=i, key=f"k{i}") for i in range(3)]
  emb = np.arange(6, dtype=np.float32).reshape(3, 2)
  np.save(tmp_path / "e.npy", emb)
  np.testing.assert_array_equal(emb_lib.load_user_embeddings(str(tmp_path / "e.npy"), items),
                                emb)
  table = pa.table({"item": ["k2", "k0", "k1"], "embedding": [[4.0, 5.0], [0.0, 1.0],
                                                              [2.0, 3.0]]})
  pq.write_table(table, tmp_path / "e.parquet")
  np.testing.assert_array_equal(
      emb_lib.load_user_embeddings(str(tmp_path / "e.parquet"), items), emb)
  np.save(tmp_path / "short.npy", emb[:2])
  with pytest.raises(UserError, match="shape"):
    emb_lib.load_user_embeddings(str(tmp_path / "short.npy"), items)
  bad = emb.copy()
  bad[1, 0] = np.nan
  np.save(tmp_path / "nan.npy", bad)
  with pytest.raises(UserError, match="NaN.*item 1"):
    emb_lib.load_user_embeddings(str(tmp_path / "nan.npy"), items)


def _interactions():
  # user 0: items 0, 1, 2 (train), then 3 (test); user 1: 2, 0 (legacy).
  return {"user": np.array([0, 0, 0, 0, 1, 1]), "item": np.array([0, 1, 2, 3, 2, 0]),
          "rating": np.ones(6, np.float32), "timestamp": np.array([1, 2, 3, 4, 1, 2]),
          "period": np.array([1, 1, 1, 3, 0, 0], np.int8)}


def test_co_occurrence_pairs_window_and_periods():
  a, b = emb_lib.co_occurrence_pairs(_interactions(), 4, window=1)
  pairs = sorted(zip(a.tolist(), b.tolist()))
  # Adjacent in training: (0,1), (1,2) for user 0 and (2,0) for user 1; never item 3 (test).
  assert pairs == sorted([(0, 1), (1, 0), (1, 2), (2, 1), (2, 0), (0, 2)])
  a, b = emb_lib.co_occurrence_pairs(_interactions(), 4, window=2)
  assert sorted(zip(a.tolist(), b.tolist())).count((0, 2)) == 2


def test_collaborative_embeddings_group_co_engaged_items():
  # Items 0-2 always watched together, items 3-5 together.
  users = np.repeat(np.arange(20), 3)
  items = np.concatenate([[0, 1, 2] if u % 2 else [3, 4, 5] for u in range(20)])
  inter = {"user": users, "item": items, "rating": np.ones(60, np.float32),
           "timestamp": np.tile([1, 2, 3], 20), "period": np.ones(60, np.int8)}
  emb = emb_lib.collaborative_embeddings(inter, 6, dim=2, window=2)
  sim = emb @ emb.T
  assert sim[0, 1] > 0.99 and sim[3, 4] > 0.99
  assert abs(sim[0, 3]) < 0.01
