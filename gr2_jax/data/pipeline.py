"""grain pipelines over the slates' tfds data sources.

Records have a variable-length history; batches pad it on the left to `max_history` (-1 = pad)
so the most recent interaction is always the last column, as everywhere else in gr2_jax.
"""

import grain
import numpy as np

from gr2_jax.data import slates as slates_lib


def pad_history(record, max_history):
  """Right-aligns the record's history (and its ratings) in a fixed width."""
  out = dict(record)
  for key, fill in (("history", -1), ("history_rating", 0.0)):
    h = np.asarray(record[key])[-max_history:]
    padded = np.full(max_history, fill, h.dtype)
    if h.size:
      padded[-h.size:] = h
    out[key] = padded
  out["history_len"] = np.int32(min(len(record["history"]), max_history))
  return out


def slate_dataset(legacy_dir, split, *, max_history, batch_size=None, shuffle=False, seed=0,
                  num_epochs=1, drop_remainder=False):
  """A grain MapDataset of (optionally shuffled, batched) slate records of one split."""
  ds = grain.MapDataset.source(slates_lib.data_sources(legacy_dir)[split])
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = ds.map(lambda r: pad_history(r, max_history))
  if batch_size:
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  return ds
