"""Code tuples: the random last level and collision statistics."""

import numpy as np


def prefix_groups(codes):
  """Group id [N] of each row (rows with equal tuples share one) and the group sizes."""
  _, inverse, counts = np.unique(np.asarray(codes), axis=0, return_inverse=True,
                                 return_counts=True)
  return inverse.reshape(-1), counts


def uniqueness(codes):
  """Distinct tuples / items."""
  codes = np.asarray(codes)
  return len(np.unique(codes, axis=0)) / max(len(codes), 1)


def largest_collision(codes):
  return int(prefix_groups(codes)[1].max()) if len(codes) else 0


def random_last_level(prefix, codebook_size, seed=0):
  """Appends random disambiguation codes so that every item's tuple is unique.

  Items sharing a learned prefix get distinct codes drawn at random from 0..C-1; when a
  prefix holds more than C items a second random level is added (for every item, so all tuples
  have one length), and the pair of codes is distinct within the prefix.
  """
  prefix = np.asarray(prefix)
  n = len(prefix)
  group, sizes = prefix_groups(prefix)
  c = codebook_size
  extra = 1 if sizes.max(initial=0) <= c else 2
  if sizes.max(initial=0) > c ** extra:
    raise ValueError(f"a prefix holds {sizes.max()} items, more than {c ** extra} codes")
  rng = np.random.default_rng(seed)
  slots = np.zeros(n, np.int64)
  order = np.argsort(group, kind="stable")
  bounds = np.concatenate([[0], np.cumsum(sizes)])
  for g, size in enumerate(sizes):
    members = order[bounds[g]:bounds[g + 1]]
    slots[members] = rng.choice(c ** extra, size, replace=False)
  disamb = (np.stack([slots // c, slots % c], 1) if extra == 2 else slots[:, None])
  return np.concatenate([prefix, disamb], 1).astype(np.int32)

