"""Eval stage: the re-ranking table on the test (or validation) slates."""

import json
import os

import numpy as np
from absl import logging

from gr2_jax.data import slates as slates_lib
from gr2_jax.errors import UserError
from gr2_jax.eval import tables


def baseline_orders(slates, popularity, seed):
  n, k = slates["slate"].shape
  return {
      "random": tables.random_orders(n, k, seed),
      "popularity": tables.order_by_scores(popularity[slates["slate"]]),
      "legacy": np.tile(np.arange(k), (n, 1)),
  }


def run(ctx):
  c = ctx.section
  legacy_dir = ctx.inputs["legacy"]
  if c.split not in slates_lib.SPLITS.values():
    raise UserError(f"eval.split must be one of {', '.join(slates_lib.SPLITS.values())}, "
                    f"got {c.split!r}")
  slates = slates_lib.load_split(legacy_dir, c.split, max_examples=c.max_examples, seed=c.seed)
  if not len(slates.get("slate", ())):
    raise UserError(f"no {c.split} slates in {legacy_dir}; use more data")
  popularity = np.load(os.path.join(legacy_dir, "popularity.npy"))
  unknown = [r for r in c.rankers if r not in ("random", "popularity", "legacy")]
  if unknown:
    raise UserError(f"unknown ranker(s) {', '.join(unknown)}; valid: random, popularity, legacy")
  orders = {name: o for name, o in baseline_orders(slates, popularity, c.seed).items()
            if name in c.rankers}
  rows = tables.evaluate(orders, slates, n_boot=c.n_boot, seed=c.seed)
  table = tables.format_table(rows)
  with open(ctx.path("table.json"), "w") as f:
    json.dump({"split": c.split, "rows": rows}, f, indent=2)
  with open(ctx.path("table.md"), "w") as f:
    f.write(table + "\n")
  logging.info("[eval] table of %d %s slates written to %s", len(slates["slate"]), c.split,
               ctx.path("table.md"))
  print(table)
  return {"split": c.split, "slates": int(len(slates["slate"])),
          "R@1": {name: row["R@1"]["mean"] for name, row in rows.items()}}
