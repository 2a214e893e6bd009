"""Readers and writers of the data stage's artifact (see WORKSPACE.md for the layout).

- `items.json`: {"items": [{"id", "key", "title", "year", "genres", "description"}, ...]}, ids 0..N-1.
- `users.json`: {"users": [{"id", "key", "age", "gender", "occupation"}, ...]}, ids 0..U-1.
- `interactions.npz`: user, item (int32), rating (float32), timestamp (int64), period (int8:
  0 legacy, 1 train, 2 validation, 3 test), sorted by (user, timestamp, item).
"""

import json
import os

import numpy as np

PERIODS = ("legacy", "train", "validation", "test")
INTERACTION_FIELDS = ("user", "item", "rating", "timestamp", "period")


def save_items(path, items):
  with open(os.path.join(path, "items.json"), "w") as f:
    json.dump({"items": items}, f)


def load_items(path):
  with open(os.path.join(path, "items.json")) as f:
    return json.load(f)["items"]


def save_users(path, users):
  with open(os.path.join(path, "users.json"), "w") as f:
    json.dump({"users": users}, f)


def load_users(path):
  with open(os.path.join(path, "users.json")) as f:
    return json.load(f)["users"]


def save_interactions(path, arrays):
  np.savez(os.path.join(path, "interactions.npz"), **{k: arrays[k] for k in INTERACTION_FIELDS})


def load_interactions(path):
  with np.load(os.path.join(path, "interactions.npz")) as z:
    return {k: z[k] for k in INTERACTION_FIELDS}


def training_mask(interactions):
  """Interactions an LLM-side stage may learn from: the legacy and train periods only."""
  return interactions["period"] <= PERIODS.index("train")
