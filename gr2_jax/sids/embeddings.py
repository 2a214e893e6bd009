"""Item embeddings for the SID tokenizer: encoded item text, user-supplied, or collaborative.

Text embeddings are cached per (encoder, text) under `$GR2_CACHE_DIR/embeddings/<encoder>/`
as npz shards keyed by the text's sha256, so a second run encodes nothing.
"""

import glob
import hashlib
import os

from absl import logging
import numpy as np

from gr2_jax.data import artifacts
from gr2_jax.data import fetch
from gr2_jax.errors import UserError

DEFAULT_FIELDS = ("title", "year", "genres")


def item_text(item, fields=DEFAULT_FIELDS, template=""):
  """One item's text, e.g. "Toy Story (1995). Genres: Animation, Comedy".

  With a `template` (str.format over the item's fields, genres joined by ", ") it is used
  verbatim; otherwise the listed fields are joined, skipping empty ones. Fields other than
  title / year / genres (user columns such as description) are written as "name: value".
  """
  values = {k: (", ".join(v) if isinstance(v, (list, tuple)) else ("" if v is None else v))
            for k, v in item.items()}
  if template:
    try:
      return template.format(**values).strip()
    except KeyError as e:
      raise UserError(f"sids text_template names field {e} that items.json lacks; item "
                      f"fields: {', '.join(sorted(item))}") from e
  head = str(values.get("title", "")).strip() if "title" in fields else ""
  if "year" in fields and values.get("year") not in ("", None):
    head = f"{head} ({values['year']})".strip()
  parts = [head] if head else []
  for f in fields:
    if f in ("title", "year"):
      continue
    if f not in item:
      raise UserError(f"sids text_fields names {f!r}, which items.json lacks; item fields: "
                      f"{', '.join(sorted(item))}")
    v = str(values[f]).strip()
    if v:
      parts.append(f"Genres: {v}" if f == "genres" else f"{f.capitalize()}: {v}")
  return ". ".join(parts)


def item_texts(items, fields=DEFAULT_FIELDS, template=""):
  texts = [item_text(it, fields, template) for it in items]
  for it, t in zip(items, texts):
    if not t:
      raise UserError(f"item {it.get('id')} ({it.get('key')!r}) has empty text under "
                      f"text_fields={','.join(fields)}; fix items.json or choose other fields")
  return texts


def _text_key(text):
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
  """npz shards of (sha256(text), embedding) for one encoder."""

  def __init__(self, encoder_name, folder=None):
    self.folder = folder or fetch.cache_dir("embeddings", encoder_name)
    os.makedirs(self.folder, exist_ok=True)

  def lookup(self, texts):
    """Returns ({key: vector} for the cached texts, list of keys wanted)."""
    wanted = {_text_key(t) for t in texts}
    found = {}
    for shard in sorted(glob.glob(os.path.join(self.folder, "*.npz"))):
      with np.load(shard) as z:
        for k, v in zip(z["keys"], z["emb"]):
          if k in wanted:
            found[str(k)] = v
    return found

  def store(self, texts, emb):
    keys = np.array([_text_key(t) for t in texts])
    name = hashlib.sha256("".join(keys).encode()).hexdigest()[:16]
    tmp = os.path.join(self.folder, name + ".tmp.npz")
    np.savez(tmp, keys=keys, emb=emb.astype(np.float32))
    os.replace(tmp, os.path.join(self.folder, name + ".npz"))


def encode_items_cached(texts, encode_fn, encoder_name, cache_folder=None):
  """Embeds `texts` with `encode_fn(list[str]) -> [n, d]`, encoding only uncached texts."""
  cache = EmbeddingCache(encoder_name, cache_folder)
  found = cache.lookup(texts)
  missing = sorted({t for t in texts if _text_key(t) not in found})
  logging.info("item embeddings: %d texts cached, %d to encode", len(texts) - len(missing),
               len(missing))
  if missing:
    emb = np.asarray(encode_fn(missing), np.float32)
    cache.store(missing, emb)
    found.update({_text_key(t): v for t, v in zip(missing, emb)})
  return np.stack([found[_text_key(t)] for t in texts]).astype(np.float32)


def text_embeddings(items, fields=DEFAULT_FIELDS, template="", batch_size=64,
                    max_length=256, cache_folder=None):
  """all-MiniLM-L6-v2 embeddings [N, 384] of the items' text, in item-id order."""
  from gr2_jax.sids import encoder  # pylint: disable=g-import-not-at-top
  texts = item_texts(items, fields, template)
  state = {}

  def encode(batch):
    if "model" not in state:
      state["model"], state["tok"] = encoder.load_minilm(max_length)
    return encoder.encode_texts(state["model"], state["tok"], batch, batch_size)

  name = f"{encoder.ENCODER_NAME}-len{max_length}"
  return encode_items_cached(texts, encode, name, cache_folder)


def load_user_embeddings(path, items):
  """Embeddings from `.npy` [N, d] in item-id order or Parquet (item key, embedding)."""
  if not os.path.isfile(path):
    raise UserError(f"sids embedding_path {path} does not exist")
  if path.endswith(".npy"):
    emb = np.load(path)
  elif path.endswith(".parquet"):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    table = pq.read_table(path).to_pydict()
    if "item" not in table or "embedding" not in table:
      raise UserError(f"{path} must have columns 'item' (item key) and 'embedding' (list); "
                      f"it has {', '.join(table)}")
    by_key = dict(zip(table["item"], table["embedding"]))
    lacking = [it["key"] for it in items if it["key"] not in by_key]
    if lacking:
      raise UserError(f"{path} has no embedding for {len(lacking)} items, e.g. {lacking[0]!r}")
    emb = np.array([by_key[it["key"]] for it in items])
  else:
    raise UserError(f"sids embedding_path {path} must end in .npy or .parquet")
  return check_embeddings(emb, len(items), path)


def check_embeddings(emb, num_items, source):
  emb = np.asarray(emb)
  if emb.ndim != 2 or emb.shape[0] != num_items:
    raise UserError(f"embeddings from {source} have shape {emb.shape}, expected "
                    f"[{num_items}, d] (one row per item, in item-id order)")
  if not np.issubdtype(emb.dtype, np.number):
    raise UserError(f"embeddings from {source} are not numeric ({emb.dtype})")
  bad = ~np.isfinite(emb).all(axis=1)
  if bad.any():
    raise UserError(f"embeddings from {source} hold NaN or inf in {int(bad.sum())} rows, "
                    f"e.g. item {int(np.flatnonzero(bad)[0])}")
  return emb.astype(np.float32)


def co_occurrence_pairs(interactions, num_items, window):
  """(a, b) item pairs within `window` steps of each other in training-period histories.

  Only the legacy and train periods are read. Both directions are returned; pairs of an item
  with itself are dropped.
  """
  keep = artifacts.training_mask(interactions)
  user = interactions["user"][keep]
  item = interactions["item"][keep]
  order = np.lexsort((item, interactions["timestamp"][keep], user))
  user, item = user[order], item[order]
  a_all, b_all = [], []
  for k in range(1, window + 1):
    same = user[k:] == user[:-k]
    a, b = item[:-k][same], item[k:][same]
    diff = a != b
    a_all += [a[diff], b[diff]]
    b_all += [b[diff], a[diff]]
  if not a_all:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  a, b = np.concatenate(a_all).astype(np.int64), np.concatenate(b_all).astype(np.int64)
  if a.size and (a.max() >= num_items or a.min() < 0):
    raise UserError(f"interactions.npz names item {int(a.max())}, but items.json has "
                    f"{num_items} items")
  return a, b


def collaborative_embeddings(interactions, num_items, dim, window):
  """Item vectors from a truncated SVD of the PPMI co-occurrence matrix (training only)."""
  a, b = co_occurrence_pairs(interactions, num_items, window)
  counts = np.zeros((num_items, num_items), np.float64)
  np.add.at(counts, (a, b), 1.0)
  total = counts.sum()
  if total == 0:
    raise UserError("no co-occurring items in the training periods; collaborative "
                    "embeddings need interactions")
  row = counts.sum(1, keepdims=True)
  with np.errstate(divide="ignore", invalid="ignore"):
    pmi = np.log(counts * total / (row * row.T))
  ppmi = np.where(np.isfinite(pmi) & (pmi > 0), pmi, 0.0)
  u, s, _ = np.linalg.svd(ppmi, hermitian=True)
  emb = u[:, :dim] * np.sqrt(s[:dim])
  norm = np.linalg.norm(emb, axis=1, keepdims=True)
  emb = emb / np.maximum(norm, 1e-12)
  # Items never seen in training get a tiny deterministic vector instead of zeros.
  unseen = norm[:, 0] < 1e-12
  if unseen.any():
    rng = np.random.default_rng(0)
    emb[unseen] = rng.normal(size=(int(unseen.sum()), emb.shape[1])) * 1e-3
  return emb.astype(np.float32)
