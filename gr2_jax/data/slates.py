"""Slates: the legacy ranker's top-K for each example, their labels, and their storage.

Slates are written as ArrayRecord through a tensorflow-datasets builder (no TensorFlow needed
to write or to read with `as_data_source`) and read back with tfds data sources into grain.
"""

import os

import numpy as np
import tensorflow_datasets as tfds

from gr2_jax.data import artifacts

BUILDER_NAME = "gr2_slates"
BUILDER_VERSION = "1.0.0"
SPLITS = {1: "train", 2: "validation", 3: "test"}


def exclusion_lists(examples, interactions):
  """Items an example's slate may not hold: its history, and items tied in time with the target
  (other than the target). Returns a padded int32 array, -1 = none."""
  width = int((examples["tie_hi"] - examples["tie_lo"]).max(initial=1))
  offs = examples["tie_lo"][:, None] + np.arange(width)[None, :]
  valid = offs < examples["tie_hi"][:, None]
  tied = np.where(valid, interactions["item"][np.minimum(offs, len(interactions["item"]) - 1)],
                  -1)
  tied = np.where(tied == examples["target"][:, None], -1, tied)
  return np.concatenate([examples["history"], tied], axis=1).astype(np.int32)


def grade(ratings, positive_rating):
  """Graded relevance of a positive: 2 (liked: rating >= positive_rating) else 1."""
  return np.where(ratings >= positive_rating, 2, 1).astype(np.int8)


def labels_for(slate, examples, positive_rating):
  """Multi-positive binary labels and graded labels [N, K] of slate items."""
  pos = np.concatenate([examples["target"][:, None], examples["further"]], axis=1)
  pos_rating = np.concatenate([examples["target_rating"][:, None], examples["further_rating"]],
                              axis=1)
  match = slate[:, :, None] == pos[:, None, :]  # [N, K, P]
  labels = match.any(-1).astype(np.int8)
  g = np.where(match, grade(pos_rating, positive_rating)[:, None, :], 0).max(-1)
  return labels, g.astype(np.int8)


def features(slate_size):
  t = tfds.features.Tensor
  return tfds.features.FeaturesDict({
      "example_id": np.int64,
      "user": np.int32,
      "timestamp": np.int64,
      "history": t(shape=(None,), dtype=np.int32),
      "history_rating": t(shape=(None,), dtype=np.float32),
      "target": np.int32,
      "target_rating": np.float32,
      "target_index": np.int32,
      "slate": t(shape=(slate_size,), dtype=np.int32),
      "slate_scores": t(shape=(slate_size,), dtype=np.float32),
      "labels": t(shape=(slate_size,), dtype=np.int8),
      "grades": t(shape=(slate_size,), dtype=np.int8),
  })


class Gr2Slates(tfds.core.GeneratorBasedBuilder):
  """Re-ranking slates; splits train / validation / test follow the temporal periods."""

  name = BUILDER_NAME
  VERSION = tfds.core.Version(BUILDER_VERSION)

  def __init__(self, *, records, slate_size, **kwargs):
    self._records = records  # split -> dict of arrays (one row per slate)
    self._slate_size = slate_size
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=features(self._slate_size))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self._records}

  def _generate_examples(self, split):
    r = self._records[split]
    for i in range(len(r["example_id"])):
      yield int(r["example_id"][i]), example_of(r, i)


def example_of(r, i):
  """Record i of a split's stacked arrays (history right-aligned, `history_len` long) as the
  builder's example dict."""
  n = int(r["history_len"][i])
  width = r["history"].shape[1]
  return {
      "example_id": r["example_id"][i],
      "user": r["user"][i],
      "timestamp": r["timestamp"][i],
      "history": r["history"][i, width - n:],
      "history_rating": r["history_rating"][i, width - n:],
      "target": r["target"][i],
      "target_rating": r["target_rating"][i],
      "target_index": r["target_index"][i],
      "slate": r["slate"][i],
      "slate_scores": r["slate_scores"][i],
      "labels": r["labels"][i],
      "grades": r["grades"][i],
  }


def write(out_dir, records, slate_size):
  """Writes the slates of each split as ArrayRecord under out_dir."""
  builder = Gr2Slates(records=records, slate_size=slate_size, data_dir=out_dir,
                      file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(verify_ssl=False))
  return builder.data_path


def data_sources(legacy_dir):
  """tfds data sources {split: random-access source} of a legacy artifact's slates."""
  path = os.path.join(legacy_dir, "tfds", BUILDER_NAME, BUILDER_VERSION)
  return tfds.builder_from_directory(path).as_data_source()


def load_split(legacy_dir, split, max_examples=0, seed=0):
  """All slates of a split as stacked numpy arrays (history right-aligned, -1 = pad),
  sorted by example_id; optionally a seeded random subset."""
  source = data_sources(legacy_dir)[split]
  idx = np.arange(len(source))
  if max_examples and len(idx) > max_examples:
    idx = np.sort(np.random.default_rng(seed).choice(idx, max_examples, replace=False))
  rows = [source[int(i)] for i in idx]
  rows.sort(key=lambda r: int(r["example_id"]))
  width = max([len(r["history"]) for r in rows], default=1)
  out = {}
  for key in rows[0] if rows else []:
    if key in ("history", "history_rating"):
      pad = -1 if key == "history" else 0
      out[key] = np.stack([np.concatenate([np.full(width - len(r[key]), pad, r[key].dtype),
                                           r[key]]) for r in rows])
    else:
      out[key] = np.stack([np.asarray(r[key]) for r in rows])
  return out


def popularity(interactions):
  """Interaction counts per item in the legacy period."""
  m = interactions["period"] == artifacts.PERIODS.index("legacy")
  n_items = int(interactions["item"].max()) + 1
  return np.bincount(interactions["item"][m], minlength=n_items).astype(np.float32)


def split_sizes(out_dir):
  """{split: slates} of the slates written under out_dir."""
  path = os.path.join(out_dir, BUILDER_NAME, BUILDER_VERSION)
  return {name: info.num_examples
          for name, info in tfds.builder_from_directory(path).info.splits.items()}
