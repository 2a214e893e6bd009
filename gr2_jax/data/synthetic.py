"""A synthetic impression log with a known ground truth, for tests and a demo.

The world: items with one to three genres and a quality; users who like a few genres (a sparse
Dirichlet preference over genres) that drift slowly; a legacy ranker that serves each request
K items ordered by quality plus a weak, noisy guess of the user's taste (it does not read the
user's history); and clicks drawn from a position-biased cascade-free model,
P(click at position p) = examination(p) * relevance(user, item), examination(p) = 1/(1+p)^eta.
A click is graded 2 (a "watch") with probability `watch_rate` times the relevance, else 1.

Since the legacy order ignores most of the user's taste, a re-ranker that reads the history
(the user's earlier clicks) has something real to learn; `true_relevance` gives the oracle.

  python -m gr2_jax.data.synthetic --out_dir=DIR --num_users=2000 --requests_per_user=50

writes `DIR/impressions.parquet` (request_id, user, timestamp, position, item, label, grade) and
`DIR/items.csv` (item, title, year, categories, description): the inputs of
`--config.data.source=impressions`.
"""

import dataclasses
import os

import numpy as np
import pandas as pd

GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "Animation",
          "Documentary", "Fantasy", "Mystery", "Western")
_ADJ = ("Silent", "Crimson", "Last", "Hidden", "Golden", "Broken", "Distant", "Midnight", "Wild",
        "Frozen", "Secret", "Electric", "Quiet", "Burning", "Lost", "Iron", "Velvet", "Northern")
_NOUN = ("Harbor", "Garden", "Empire", "Signal", "River", "Machine", "Orchard", "Frontier",
         "Mirror", "Station", "Kingdom", "Letter", "Island", "Canyon", "Lantern", "Voyage",
         "Circus", "Archive", "Summer", "Engine")


@dataclasses.dataclass
class World:
  item_genres: np.ndarray  # float32 [I, G], rows sum to 1
  item_quality: np.ndarray  # float32 [I]
  user_taste: np.ndarray  # float32 [U, G], rows sum to 1
  items: pd.DataFrame  # item, title, year, categories, description
  eta: float  # position-bias exponent


def true_relevance(world, users, items):
  """P(relevant) of items [.., K] for users [..] (the generator's click model without the
  position bias)."""
  taste = world.user_taste[users]  # [N, G]
  match = np.einsum("ng,nkg->nk", taste, world.item_genres[items]) * len(GENRES)
  return 1.0 / (1.0 + np.exp(-(1.2 * match + 0.3 * world.item_quality[items] - 5.0)))


def make_world(num_users, num_items, seed=0, eta=0.8):
  rng = np.random.default_rng(seed)
  g = len(GENRES)
  genres = np.zeros((num_items, g), np.float32)
  for i in range(num_items):
    k = rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15])
    genres[i, rng.choice(g, k, replace=False)] = 1.0
  genres /= genres.sum(1, keepdims=True)
  quality = rng.normal(0, 1, num_items).astype(np.float32)
  taste = rng.dirichlet(np.full(g, 0.25), num_users).astype(np.float32)
  titles = [f"The {_ADJ[rng.integers(len(_ADJ))]} {_NOUN[rng.integers(len(_NOUN))]}"
            for _ in range(num_items)]
  seen = {}
  for i, t in enumerate(titles):  # distinct titles: a numeral on repeats, as sequels do
    seen[t] = seen.get(t, 0) + 1
    if seen[t] > 1:
      titles[i] = f"{t} {seen[t]}"
  items = pd.DataFrame({
      "item": [f"i{i:05d}" for i in range(num_items)],
      "title": titles,
      "year": rng.integers(1950, 2024, num_items),
      "categories": ["|".join(GENRES[j] for j in np.flatnonzero(row)) for row in genres],
      "description": "",
  })
  return World(genres, quality, taste, items, eta)


def generate(num_users=500, num_items=400, requests_per_user=30, slate_size=10,
             candidates=60, legacy_taste_weight=0.05, watch_rate=0.5, eta=0.8,
             days=180, seed=0):
  """Returns (impressions DataFrame, World). One row per shown item, rows of a request in
  position order; requests of all users interleaved in time."""
  world = make_world(num_users, num_items, seed=seed, eta=eta)
  rng = np.random.default_rng(seed + 1)
  n_req = num_users * requests_per_user
  users = np.repeat(np.arange(num_users), requests_per_user)
  # Each user is active over a random stretch of the period; requests spread over it.
  first = rng.uniform(0, 0.7, num_users) * days * 86400
  span = rng.uniform(0.2, 0.3, num_users) * days * 86400
  ts = (1_600_000_000 + first[users] + rng.uniform(0, 1, n_req) * span[users]).astype(np.int64)
  # Candidates drawn by quality (a popularity-like retrieval), scored by the legacy ranker:
  # quality plus a weak, noisy share of the user's taste, then the top K served in order.
  # (Sampling without replacement in proportion to exp(quality): the Gumbel top-k trick.)
  candidates = min(candidates, num_items)
  rows = []
  batch = max(1, 4_000_000 // num_items)
  for s in range(0, n_req, batch):
    u = users[s:s + batch]
    n = len(u)
    keys = world.item_quality[None, :] + rng.gumbel(size=(n, num_items)).astype(np.float32)
    cand = np.argpartition(-keys, candidates - 1, axis=1)[:, :candidates]
    taste_match = np.einsum("ng,nkg->nk", world.user_taste[u], world.item_genres[cand])
    legacy = (world.item_quality[cand] + legacy_taste_weight * taste_match * len(GENRES)
              + rng.normal(0, 1.0, cand.shape))
    top = np.argsort(-legacy, axis=1, kind="stable")[:, :slate_size]
    shown = np.take_along_axis(cand, top, 1)
    rel = true_relevance(world, u, shown)
    exam = 1.0 / (1.0 + np.arange(slate_size)) ** eta
    click = rng.random(shown.shape) < rel * exam[None, :]
    watch = click & (rng.random(shown.shape) < watch_rate * rel)
    rows.append((u, shown, click, watch))
  u = np.concatenate([r[0] for r in rows])
  shown = np.concatenate([r[1] for r in rows])
  click = np.concatenate([r[2] for r in rows])
  watch = np.concatenate([r[3] for r in rows])
  k = slate_size
  frame = pd.DataFrame({
      "request_id": np.repeat([f"r{i:08d}" for i in range(n_req)], k),
      "user": np.repeat([f"u{x:06d}" for x in u], k),
      "timestamp": np.repeat(ts, k),
      "position": np.tile(np.arange(k), n_req),
      "item": world.items["item"].to_numpy()[shown.reshape(-1)],
      "label": click.reshape(-1).astype(np.float32),
      "grade": np.where(watch, 2, click.astype(np.int8)).reshape(-1).astype(np.int8),
  })
  order = np.argsort(ts, kind="stable")  # the log in time order, as a funnel writes it
  idx = (order[:, None] * k + np.arange(k)[None, :]).reshape(-1)
  return frame.iloc[idx].reset_index(drop=True), world


def write(out_dir, frame, world):
  os.makedirs(out_dir, exist_ok=True)
  imp = os.path.join(out_dir, "impressions.parquet")
  items = os.path.join(out_dir, "items.csv")
  frame.to_parquet(imp, index=False, row_group_size=1_000_000)
  world.items.to_csv(items, index=False)
  return imp, items


def main(argv):
  del argv
  from absl import flags
  from absl import logging
  f = flags.FLAGS
  frame, world = generate(num_users=f.num_users, num_items=f.num_items,
                          requests_per_user=f.requests_per_user, slate_size=f.slate_size,
                          seed=f.seed)
  imp, items = write(f.out_dir, frame, world)
  logging.info("wrote %s (%d rows, %d requests, CTR %.3f) and %s", imp, len(frame),
               len(frame) // f.slate_size, frame["label"].mean(), items)


if __name__ == "__main__":
  from absl import app
  from absl import flags
  flags.DEFINE_string("out_dir", None, "folder for impressions.parquet and items.csv")
  flags.DEFINE_integer("num_users", 2000, "users")
  flags.DEFINE_integer("num_items", 1000, "items")
  flags.DEFINE_integer("requests_per_user", 50, "requests per user")
  flags.DEFINE_integer("slate_size", 10, "items shown per request")
  flags.DEFINE_integer("seed", 0, "seed")
  flags.mark_flag_as_required("out_dir")
  app.run(main)
