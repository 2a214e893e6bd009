"""The rankers stage's scores on the validation and test slates, and their use in a table.

`scores_<split>.npz` holds `example_id` [N] (sorted) and one float32 [N, K] array per ranker;
a table looks its slates up by example id, so the LLM rows and these rows rank the same slates.
"""

import os

import numpy as np

from gr2_jax.errors import UserError
from gr2_jax.eval import metrics
from gr2_jax.eval import tables

RANKERS = ("legacy_refreshed", "cf", "lambdamart", "prm")


def path(rankers_dir, split):
  return os.path.join(rankers_dir, f"scores_{split}.npz")


def save(rankers_dir, split, example_id, scores):
  example_id = np.asarray(example_id, np.int64)
  if (np.diff(example_id) <= 0).any():
    raise ValueError("example ids must be sorted and unique")
  tmp = path(rankers_dir, split) + ".tmp.npz"
  np.savez(tmp, example_id=example_id, **{k: np.asarray(v, np.float32)
                                           for k, v in scores.items()})
  os.replace(tmp, path(rankers_dir, split))


def names(rankers_dir, split):
  """The rankers scored in `rankers_dir` for `split`, in `RANKERS` order (none for a split the
  stage does not score, such as train)."""
  if not os.path.isfile(path(rankers_dir, split)):
    return []
  with np.load(path(rankers_dir, split)) as z:
    return [r for r in RANKERS if r in z.files]


def orders(rankers_dir, split, slates, wanted=None):
  """{ranker: order [N, K]} on `slates` (a `slates.load_split` dict) for the `wanted` rankers
  (default: every one the artifact scored)."""
  p = path(rankers_dir, split)
  if not os.path.isfile(p):
    raise UserError(f"{p} is missing: the rankers stage scored no {split} slates")
  with np.load(p) as z:
    have = [r for r in RANKERS if r in z.files]
    wanted = have if wanted is None else list(wanted)
    missing = [r for r in wanted if r not in have]
    if missing:
      raise UserError(f"rankers {', '.join(missing)} are not in {p} (it has "
                      f"{', '.join(have) or 'none'}); add them to rankers.rankers")
    ids = z["example_id"]
    want = np.asarray(slates["example_id"], np.int64)
    pos = np.minimum(np.searchsorted(ids, want), max(len(ids) - 1, 0))
    if not len(ids) or (ids[pos] != want).any():
      bad = int((ids[pos] != want).sum()) if len(ids) else len(want)
      raise UserError(f"{bad} of {len(want)} {split} slates have no scores in {p}: it was made "
                      "from other slates")
    return {r: tables.order_by_scores(z[r][pos]) for r in wanted}


def best_vs_best(orders_, slates, llm_rows, baseline_rows, metric="R@1", n_boot=1000, seed=0):
  """Paired lift of the best LLM row over the best of `baseline_rows` (best = highest mean
  `metric` on these slates); None when either side is empty."""
  llm_rows = [r for r in llm_rows if r in orders_]
  baseline_rows = [r for r in baseline_rows if r in orders_]
  if not llm_rows or not baseline_rows:
    return None
  values = {r: tables.per_example(orders_[r], slates)[metric] for r in llm_rows + baseline_rows}
  best_llm = max(llm_rows, key=lambda r: np.nanmean(values[r]))
  best_base = max(baseline_rows, key=lambda r: np.nanmean(values[r]))
  return {"llm": best_llm, "baseline": best_base, "metric": metric,
          **metrics.paired_bootstrap(values[best_llm], values[best_base], n_boot=n_boot,
                                     seed=seed)}


def best_vs_best_markdown(result):
  if not result:
    return ""
  r = result
  return (f"Best LLM row ({r['llm']}) vs the best learned baseline ({r['baseline']}), paired "
          f"{r['metric']}: {r['diff']:+.4f} [{r['diff_lo']:+.4f}, {r['diff_hi']:+.4f}], relative "
          f"{100 * r['lift']:+.1f}% [{100 * r['lift_lo']:+.1f}, {100 * r['lift_hi']:+.1f}] on "
          f"{r['n']} slates.")
