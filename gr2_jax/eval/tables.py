"""The re-ranking table: every ranker's metrics on the same slates, with intervals and the
paired lift over the legacy order. Later stages add their models' rows to it."""

import numpy as np

from gr2_jax.eval import metrics

# (column, kind, k): single-target recall / NDCG, and the multi-positive forms.
COLUMNS = (("R@1", "recall", 1), ("R@3", "recall", 3), ("R@5", "recall", 5),
           ("N@3", "ndcg", 3), ("N@5", "ndcg", 5))
MULTI_COLUMNS = (("AUC", "auc", None), ("gN@5", "graded_ndcg", 5), ("mR@3", "multi_recall", 3))


def order_by_scores(scores):
  """Slate positions sorted by descending score (stable: ties keep the slate order)."""
  return np.argsort(-np.asarray(scores), axis=1, kind="stable")


def random_orders(n, k, seed):
  rng = np.random.default_rng(seed)
  return np.argsort(rng.random((n, k)), axis=1)


def per_example(order, slates):
  """Per-example metric arrays for one ranker's output orders on the slates."""
  ranks = metrics.target_ranks(order, slates["target_index"])
  labels = np.take_along_axis(slates["labels"], order, axis=1)
  grades = np.take_along_axis(slates["grades"], order, axis=1)
  out = {}
  for name, kind, k in COLUMNS:
    out[name] = metrics.recall_at_k(ranks, k) if kind == "recall" else metrics.ndcg_at_k(ranks, k)
  out["AUC"] = metrics.auc(labels)
  out["gN@5"] = metrics.graded_ndcg_at_k(grades, 5)
  out["mR@3"] = metrics.multi_recall_at_k(labels, 3)
  return out


def evaluate(orders, slates, reference="legacy", n_boot=1000, seed=0):
  """Rows {ranker: {metric: ci, "lift": {metric: paired}}} for each ranker's orders."""
  values = {name: per_example(order, slates) for name, order in orders.items()}
  rows = {}
  for name, vals in values.items():
    row = {m: metrics.bootstrap_ci(v, n_boot=n_boot, seed=seed) for m, v in vals.items()}
    if reference in values and name != reference:
      row["lift"] = {m: metrics.paired_bootstrap(v, values[reference][m], n_boot=n_boot,
                                                 seed=seed) for m, v in vals.items()}
    rows[name] = row
  return rows


def format_table(rows, reference="legacy", lift_metric="R@1"):
  """Markdown table: mean [95% CI] per metric and the relative lift over the reference."""
  cols = [c[0] for c in COLUMNS] + ["AUC"]
  head = "| ranker | " + " | ".join(cols) + f" | {lift_metric} lift vs {reference} |"
  lines = [head, "|" + "---|" * (len(cols) + 2)]
  for name, row in rows.items():
    cells = [f"{row[c]['mean']:.4f} [{row[c]['lo']:.4f}, {row[c]['hi']:.4f}]" for c in cols]
    if "lift" in row:
      l = row["lift"][lift_metric]
      lift = f"{100 * l['lift']:+.1f}% [{100 * l['lift_lo']:+.1f}, {100 * l['lift_hi']:+.1f}]"
    else:
      lift = "-"
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {lift} |")
  n = next(iter(rows.values()))["R@1"]["n"] if rows else 0
  lines.append(f"\n{n} slates; 95% bootstrap intervals; lift = paired bootstrap of the relative "
               f"difference.")
  return "\n".join(lines)
