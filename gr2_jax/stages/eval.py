"""Eval stage: the re-ranking table on the test (or validation) slates.

With `checkpoints`, a second table compares models re-ranking a seeded subset of the slates
(greedy decoding, with and without the slate constraint; an invalid answer counts as the
legacy order) with the baselines on the same subset, plus each model's diagnostics.
"""

import json
import os

import numpy as np
from absl import logging

from gr2_jax.data import artifacts
from gr2_jax.data import slates as slates_lib
from gr2_jax import runner
from gr2_jax.errors import UserError
from gr2_jax.eval import compare
from gr2_jax.eval import tables
from gr2_jax.parallel import runtime as runtime_lib
from gr2_jax.rankers import scores as scores_lib
from gr2_jax.rerank import evaluate as rerank_lib
from gr2_jax.teachers import evidence as evidence_lib


def parse_checkpoints(entries):
  """{name: folder} of "name=folder" entries."""
  out = {}
  for e in entries:
    name, sep, path = str(e).partition("=")
    if not sep or not name.strip() or not path.strip():
      raise UserError(f"eval.checkpoints entries must read name=folder, got {e!r}")
    if name.strip() in out or name.strip() in compare.BASELINES:
      raise UserError(f"eval.checkpoints names must be unique and not a baseline's: {e!r}")
    out[name.strip()] = path.strip()
  return out


def model_table(ctx, popularity):
  """Rows and diagnostics of the checkpoints and the baselines on the model subset."""
  c = ctx.section
  legacy_dir = ctx.inputs["legacy"]
  data_dir = runner.artifact_dir(ctx.workdir, ctx.config, "data")  # an input of legacy
  items, users = artifacts.load_items(data_dir), artifacts.load_users(data_dir)
  slates = slates_lib.load_split(legacy_dir, c.split, max_examples=c.model_examples,
                                 seed=c.seed)
  checkpoints = parse_checkpoints(c.checkpoints)
  for path in checkpoints.values():
    if not os.path.isdir(path):
      raise UserError(f"eval.checkpoints: {path} does not exist")

  def loader(path):
    def load():
      prompt_cfg, sids = rerank_lib.load_rerank_info(path)
      if len(sids) != len(items):
        raise UserError(f"{path} was trained on a SID table of {len(sids)} items but the data "
                        f"has {len(items)}; evaluate it in its own workdir")
      # The checkpoints are decoded on one device (--config.runtime sets their numerics).
      model, tok = runtime_lib.for_stage(ctx, num_devices=1).load(path)
      return model, tok, sids, prompt_cfg
    return load

  return compare.compare_models(
      slates, popularity, [(name, loader(path)) for name, path in checkpoints.items()],
      items=items, users=users, rankers=tuple(c.rankers), seed=c.seed, n_boot=c.n_boot,
      max_new_tokens=c.max_new_tokens, batch_size=c.batch_size, constrained=c.constrained,
      evidence=lambda prompt_cfg: evidence_lib.for_prompt(prompt_cfg, data_dir),
      rankers_dir=ctx.inputs["rankers"], split=c.split)


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
  compare.check_rankers(c.rankers)
  if c.split == "train" and set(c.rankers) & set(scores_lib.RANKERS):
    raise UserError("the learned rankers are scored on the validation and test splits only; "
                    "drop them from eval.rankers to evaluate train slates")
  rows = compare.baseline_rows(slates, popularity, c.rankers, c.seed, c.n_boot,
                       ctx.inputs["rankers"], c.split)
  table = tables.format_table(rows)
  result = {"split": c.split, "rows": rows}
  if c.checkpoints:
    result["models"] = model_table(ctx, popularity)
    table += (f"\n\nModels on {result['models']['slates']} seeded {c.split} slates (baselines "
              "scored again on them):\n\n"
              + compare.models_markdown(result["models"]))
  with open(ctx.path("table.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(ctx.path("table.md"), "w") as f:
    f.write(table + "\n")
  logging.info("[eval] table of %d %s slates written to %s", len(slates["slate"]), c.split,
               ctx.path("table.md"))
  print(table)
  summary = {"split": c.split, "slates": int(len(slates["slate"])),
             "R@1": {name: row["R@1"]["mean"] for name, row in rows.items()}}
  if c.checkpoints:
    models = result["models"]
    summary["models"] = {name: {"R@1": row["R@1"]["mean"],
                                "valid_rate": models["diagnostics"].get(name, {}).get(
                                    "valid_rate")}
                         for name, row in models["rows"].items()}
  return summary
