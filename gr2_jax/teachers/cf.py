"""Collaborative-filtering teacher: ranks a slate from training-period statistics (no LLM) and
writes a short three-step trace that cites history and candidate items by SID.

Score of a candidate = weighted sum of its features, each standardized across the slate:
co-occurrence with recent history items, transition from the last few items, genre match with
the history's recency-weighted genre profile, log popularity, and the legacy slot. Rankings are
sampled by Gumbel-top-k (Plackett-Luce) from scores / temperature; temperature 0 is the argsort.

  python -m gr2_jax.teachers.cf --workdir=W [--split=validation] [--tune]
prints the teacher's greedy metrics against the legacy order on W's slates (after a grid search
of the weights on the same split with --tune).
"""

import copy
import itertools
import os
import re
import sys

from absl import app
from absl import flags
import ml_collections
import numpy as np

from gr2_jax.data import artifacts
from gr2_jax.data import slates as slates_lib
from gr2_jax.errors import UserError
from gr2_jax.eval import tables
from gr2_jax.teachers import cf_stats
from gr2_jax.teachers import base
from gr2_jax.text import prompts

FEATURES = ("cooc", "transition", "genre", "popularity", "position")
_EXPLAINED = ("cooc", "transition", "genre", "popularity")  # the legacy slot is no reason


def default_config():
  """Defaults tuned by grid search (R@1 + N@3 of the greedy order) on the MovieLens-1M
  validation slates; the legacy slot and popularity earned weight 0 there."""
  c = ml_collections.ConfigDict()
  c.recent = 10  # most recent history items whose co-occurrences count
  c.last_n = 1  # most recent history items whose transitions count
  c.decay = 0.9  # weight of the k-th most recent item (0 = last): decay ** k
  c.genre_decay = 0.95  # the same for the genre profile, over the whole shown history
  c.weights = ml_collections.ConfigDict(
      {"cooc": 1.0, "transition": 1.0, "genre": 0.25, "popularity": 0.0, "position": 0.0})
  c.temperature = 1.0
  c.trace_candidates = 3  # candidates discussed in step 2
  c.min_evidence = 2  # counts a trace needs to say an item "often" follows / goes with another
  return c


def _recency_weights(valid, decay):
  """decay ** age for right-aligned rows (last column = age 0), 0 on padding."""
  age = np.arange(valid.shape[1])[::-1]
  return np.where(valid, decay ** age, 0.0)


def standardize(f):
  """Z-scores across the slate (last axis); a constant feature becomes 0."""
  mu = f.mean(-1, keepdims=True)
  sd = f.std(-1, keepdims=True)
  return np.where(sd > 0, (f - mu) / np.where(sd > 0, sd, 1.0), 0.0)


def cooc_norm(stats, a, b, minus=0.0):
  """Cosine-normalised co-occurrence of items a and b (broadcasting index arrays); `minus`
  (counts, e.g. a user's own, `cf_stats.OwnCounts`) is taken off the pair counts first."""
  deg = stats.cooc_degree + 1.0
  return (stats.cooc[a, b] - minus) / np.sqrt(deg[a] * deg[b])


def transition_prob(stats, a, b, minus=0.0):
  """Estimated P(next = b | a) from the transition counts (add-one on the denominator), with
  `minus` taken off the counts as in `cooc_norm`."""
  return (stats.transitions[a, b] - minus) / (stats.transitions_out[a] + 1.0)


def genre_profile(stats, history, decay):
  """Recency-weighted share of each genre in the history rows: [N, G], rows sum to 1 (or 0)."""
  w = _recency_weights(history >= 0, decay)
  g = (stats.item_genres[np.maximum(history, 0)] * w[..., None]).sum(1)
  tot = g.sum(-1, keepdims=True)
  return g / np.where(tot > 0, tot, 1.0)


def features(stats, history, slate, cfg, own=None, users=None):
  """Raw features {name: [N, K]} of slate items (`FEATURES`, and `cooc_count`, the unweighted
  co-occurrence count with the recent history); history int [N, H] right-aligned, -1 pads.

  With `own` (`cf_stats.OwnCounts`) and `users` [N] (-1 = no correction), each row's counts
  leave out its user's own interactions (leave-user-out, for training-period examples).
  """
  history = np.asarray(history)
  slate = np.asarray(slate)
  if own is None:
    users = np.full(len(slate), -1)
  u = np.asarray(users)[:, None, None]
  recent = history[:, -cfg.recent:]
  w = _recency_weights(recent >= 0, cfg.decay)
  hc = np.maximum(recent, 0)[:, :, None]
  s = slate[:, None, :]
  minus = 0.0 if own is None else own.cooc(u, hc, s)
  cooc = (w[:, :, None] * cooc_norm(stats, hc, s, minus)).sum(1)
  # The unweighted pair counts with the recent history (padding excluded): the evidence
  # field's "co-watched" number, a feature of the learned re-rankers.
  cooc_count = ((stats.cooc[hc, s] - minus) * (recent >= 0)[:, :, None]).sum(1)
  last = history[:, -cfg.last_n:]
  wl = _recency_weights(last >= 0, cfg.decay)
  lc = np.maximum(last, 0)[:, :, None]
  minus = 0.0 if own is None else own.transitions(u, lc, s)
  trans = (wl[:, :, None] * transition_prob(stats, lc, s, minus)).sum(1)
  profile = genre_profile(stats, history, cfg.genre_decay)  # [N, G]
  cand = stats.item_genres[slate]  # [N, K, G]
  genre = (cand * profile[:, None, :]).sum(-1) / np.maximum(cand.sum(-1), 1.0)
  k = slate.shape[1]
  pop = stats.popularity[slate]
  if own is not None:
    pop = pop - own.popularity(np.asarray(users)[:, None], slate)
  return {"cooc": cooc, "transition": trans, "genre": genre, "cooc_count": cooc_count,
          "popularity": np.log1p(pop),
          "position": np.broadcast_to(1.0 / np.log2(np.arange(k) + 2.0), slate.shape)}


def scores(stats, history, slate, cfg, own=None, users=None):
  """Weighted sum of standardized features: [N, K] (`own`, `users`: as in `features`)."""
  f = features(stats, history, slate, cfg, own, users)
  return sum(cfg.weights[name] * standardize(f[name]) for name in FEATURES)


def sample_orders(s, temperature, rng, num_samples=1):
  """Plackett-Luce rankings [num_samples, K] of scores s [K] by Gumbel-top-k; temperature <= 0
  gives the score order (ties keep the slate order)."""
  s = np.asarray(s, np.float64)
  if temperature <= 0:
    return np.tile(np.argsort(-s, kind="stable"), (num_samples, 1))
  g = rng.gumbel(size=(num_samples, len(s)))
  return np.argsort(-(s / temperature + g), axis=1, kind="stable")


_STEP1 = (
    "Step 1: the history leans to {genres}; the latest picks are {recent}.",
    "Step 1, patterns: mostly {genres}, most recently {recent}.",
    "Step 1: this viewer watches mainly {genres}; recent titles: {recent}.",
)
_CLAUSES = {
    "transition": ("{c} often comes right after {h}", "{c} is a frequent next pick after {h}",
                   "viewers of {h} often go on to {c}"),
    "cooc": ("{c} is often watched together with {h}", "{c} co-occurs with {h} in many histories",
             "{c} pairs well with {h}"),
    "genre": ("{c} fits the {g} taste", "{c} matches the {g} pattern",
              "{c} is {g}, in line with the history"),
    "popularity": ("{c} is widely watched", "{c} is among the most watched candidates"),
    "weak": ("{c} has little support in the history", "{c} is a weaker fit"),
}
_STEP2 = ("Step 2: {clauses}.", "Step 2, matching: {clauses}.", "Step 2: {clauses}.")
_STEP3 = (
    "Step 3: {top} goes first: {why}.",
    "Step 3, choice: {top} ranks first because {why}.",
    "Step 3: I put {top} first since {why}.",
)
_WHY = {
    "transition": "it directly follows {h}",
    "cooc": "it is watched alongside {h}",
    "genre": "it best fits the {g} taste",
    "popularity": "it is broadly watched",
    "weak": "it is the most plausible next watch overall",
}


def template_texts():
  """The fixed wording of the traces (placeholders dropped), e.g. for tokenizer training."""
  parts = list(_STEP1) + list(_STEP2) + list(_STEP3) + list(_WHY.values())
  parts += [t for ts in _CLAUSES.values() for t in ts]
  return [re.sub(r"\{\w+\}", "", t) for t in parts]


class CFTeacher(base.Teacher):
  """Ranks with `scores` and explains with the strongest evidence of each discussed item."""

  def __init__(self, stats, items, sids, config=None, prompt_cfg=None):
    self.stats = stats
    self.items = items
    self.sids = sids
    self.cfg = copy.deepcopy(config) if config is not None else default_config()
    self.prompt_cfg = prompt_cfg if prompt_cfg is not None else prompts.PromptConfig()
    # Features only look at what the prompt shows, so the trace can cite all of it.
    self.cfg.recent = min(self.cfg.recent, self.prompt_cfg.max_history)
    self.cfg.last_n = min(self.cfg.last_n, self.prompt_cfg.max_history)

  def _shown(self, history):
    return np.asarray(list(history)[-self.prompt_cfg.max_history:], np.int64)

  def score_slates(self, history, slate):
    """Scores [N, K] of stacked slates (history right-aligned, -1 pads)."""
    history = np.asarray(history)[:, -self.prompt_cfg.max_history:]
    return scores(self.stats, history, slate, self.cfg)

  def greedy_orders(self, slates):
    """Temperature-0 orders [N, K] of stacked slate records."""
    return tables.order_by_scores(self.score_slates(slates["history"], slates["slate"]))

  def _ref(self, item):
    """An item as the trace cites it: its SID, with the title when the prompt shows titles."""
    if "title" not in self.prompt_cfg.item_fields:
      return self.sids[item]
    return f"{self.sids[item]} ({self.items[item]['title']})"

  def _evidence(self, hist, slate, profile, contrib):
    """Per slate position: (kind, history item or None, genre or None) of its best support.

    The kinds are tried by their contribution to the candidate's score, largest first; one
    counts only if it contributes positively and the statistics back it (a transition or
    co-occurrence seen at least `min_evidence` times, a genre shared with the history's top
    genres).
    """
    cfg = self.cfg
    recent = hist[-cfg.recent:]
    w_r = cfg.decay ** np.arange(len(recent))[::-1]
    last = hist[-cfg.last_n:]
    w_l = cfg.decay ** np.arange(len(last))[::-1]
    top_genres = [self.stats.genres[j] for j in np.argsort(-profile, kind="stable")[:3]
                  if profile[j] > 0]
    out = []
    for p, c in enumerate(slate):
      found = ("weak", None, None)
      for kind in sorted(_EXPLAINED, key=lambda f: -contrib[f][p]):
        if contrib[kind][p] <= 0:
          break
        if kind == "transition" and len(last):
          j = int(np.argmax(w_l * transition_prob(self.stats, last, c)))
          if self.stats.transitions[last[j], c] >= cfg.min_evidence:
            found = (kind, int(last[j]), None)
        elif kind == "cooc" and len(recent):
          j = int(np.argmax(w_r * cooc_norm(self.stats, recent, c)))
          if self.stats.cooc[recent[j], c] >= cfg.min_evidence:
            found = (kind, int(recent[j]), None)
        elif kind == "genre":
          shared = [g for g in top_genres if g in self.items[c].get("genres", ())]
          if shared:
            found = (kind, None, shared[0])
        elif kind == "popularity":
          found = (kind, None, None)
        if found[0] != "weak":
          break
      out.append(found)
    return out

  def _contributions(self, hist, slate):
    """Scores [K] and each feature's weighted standardized contribution {name: [K]}."""
    padded = np.concatenate([np.full(max(1, len(hist)) - len(hist), -1), hist])[None, :]
    f = features(self.stats, padded, slate[None, :], self.cfg)
    contrib = {name: self.cfg.weights[name] * standardize(f[name])[0] for name in FEATURES}
    return sum(contrib.values()), contrib

  def explain(self, history, slate, order, rng, contrib=None):
    """The three-step trace for `order` (slate positions) of `slate` given `history`, and the
    kind of evidence given for the top item."""
    hist = self._shown(history)
    slate = np.asarray(slate, np.int64)
    if contrib is None:
      _, contrib = self._contributions(hist, slate)
    profile = genre_profile(self.stats, hist[None, :], self.cfg.genre_decay)[0]
    top = [j for j in np.argsort(-profile, kind="stable")[:2] if profile[j] > 0]
    genres = " and ".join(f"{self.stats.genres[j]} ({round(100 * profile[j])}%)" for j in top)
    recent = " and ".join(self._ref(int(h)) for h in hist[-2:][::-1]) or "nothing yet"
    step1 = rng.choice(_STEP1).format(genres=genres or "no clear genre", recent=recent)
    ev = self._evidence(hist, slate, profile, contrib)

    def fill(template, pos):
      kind, h, g = ev[pos]
      return template.format(c=self._ref(int(slate[pos])), h=self._ref(h) if h is not None else "",
                             g=g or "")

    clauses = [fill(rng.choice(_CLAUSES[ev[p][0]]), p) for p in order[:self.cfg.trace_candidates]]
    step2 = rng.choice(_STEP2).format(clauses="; ".join(clauses))
    kind, h, g = ev[order[0]]
    why = _WHY[kind].format(h=self._ref(h) if h is not None else "", g=g or "")
    step3 = rng.choice(_STEP3).format(top=self._ref(int(slate[order[0]])), why=why)
    return " ".join([step1, step2, step3]), ev[order[0]][0]

  def sample(self, example, *, target_visible, rng, num_samples=1):
    rng = np.random.default_rng(rng)
    slate = np.asarray(example.slate, np.int64)
    s, contrib = self._contributions(self._shown(example.history), slate)
    orders = sample_orders(s, self.cfg.temperature, rng, num_samples)
    if target_visible:
      t = list(example.slate).index(example.target)
      orders = np.stack([np.concatenate([[t], o[o != t]]) for o in orders])
    outs = []
    for o in orders:
      order = tuple(int(p) for p in o)
      trace, kind = self.explain(example.history, slate, order, rng, contrib)
      recs = prompts.recommendations(order, [self.sids[int(x)] for x in slate],
                                     self.prompt_cfg.answer_format)
      text = prompts.render_answer(recs, trace if self.prompt_cfg.reasoning else None)
      outs.append(base.TeacherOutput(text=text, order=order, meta={
          "scores": [float(x) for x in s], "targeted": bool(target_visible),
          "temperature": float(self.cfg.temperature), "top_evidence": kind}))
    return outs


def evaluate_teacher(teacher, slates, n_boot=1000, seed=0):
  """Greedy teacher orders vs the legacy order on stacked slate records: (rows, markdown)."""
  n, k = slates["slate"].shape
  orders = {"legacy": np.tile(np.arange(k), (n, 1)), "cf_teacher": teacher.greedy_orders(slates)}
  rows = tables.evaluate(orders, slates, n_boot=n_boot, seed=seed)
  return rows, tables.format_table(rows)


def grid_search(teacher, slates, grid):
  """Weights (one value list per feature in `grid`) maximising R@1 + N@3 of the greedy order.

  Returns (best weights dict, {"R@1", "R@3", "N@3"} of the best)."""
  history = np.asarray(slates["history"])[:, -teacher.prompt_cfg.max_history:]
  z = {name: standardize(v) for name, v in
       features(teacher.stats, history, slates["slate"], teacher.cfg).items()}
  names = list(grid)
  best = None
  for values in itertools.product(*(grid[n] for n in names)):
    w = dict(teacher.cfg.weights.to_dict(), **dict(zip(names, values)))
    vals = tables.per_example(tables.order_by_scores(sum(w[f] * z[f] for f in FEATURES)), slates)
    m = {k: float(vals[k].mean()) for k in ("R@1", "R@3", "N@3")}
    if best is None or m["R@1"] + m["N@3"] > best[1]["R@1"] + best[1]["N@3"]:
      best = (w, m)
  return best


def _latest(workdir, stage):
  path = os.path.join(workdir, stage, "latest")
  if not os.path.isdir(path):
    raise UserError(f"{path} does not exist; run the {stage} stage with --workdir={workdir}")
  return os.path.realpath(path)


_GRID = {"cooc": [1.0], "transition": [0.5, 1.0, 2.0], "genre": [0.0, 0.25, 0.5],
         "popularity": [0.0, 0.1], "position": [0.0, 0.25, 0.5]}


def main(argv):
  del argv
  try:
    _evaluate_workdir(flags.FLAGS)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _evaluate_workdir(f):
  if f.split not in slates_lib.SPLITS.values():
    raise UserError(f"--split must be one of {', '.join(slates_lib.SPLITS.values())}, "
                    f"got {f.split!r}")
  data_dir, legacy_dir = _latest(f.workdir, "data"), _latest(f.workdir, "legacy")
  items = artifacts.load_items(data_dir)
  stats = cf_stats.compute_stats(artifacts.load_interactions(data_dir), items, window=f.window)
  slates = slates_lib.load_split(legacy_dir, f.split, max_examples=f.max_examples)
  teacher = CFTeacher(stats, items, [str(i) for i in range(len(items))])
  if f.tune:
    weights, m = grid_search(teacher, slates, _GRID)
    print(f"best weights {weights}: {m}")
    teacher.cfg.weights.update(weights)
  _, table = evaluate_teacher(teacher, slates)
  print(f"{f.split} slates of {legacy_dir}\n{table}")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "workdir holding data and legacy artifacts", required=True)
  flags.DEFINE_string("split", "validation", "slate split to evaluate on")
  flags.DEFINE_integer("max_examples", 0, "random subset of the split (0 = all)")
  flags.DEFINE_integer("window", 5, "co-occurrence window of the statistics")
  flags.DEFINE_bool("tune", False, "grid-search the feature weights on the split first")
  app.run(main)
