"""The reasoning-free RL pass on the tiny pipeline: rollouts write the list alone under the
strict list constraint, the artifact's prompt bypasses the reasoning, and the table holds the
RL model with and without its reasoning beside the internalized one."""

import json
import os

import numpy as np
import pytest

from gr2_jax import config_lib
from gr2_jax import runner
from gr2_jax.errors import UserError
from gr2_jax.rerank import evaluate as rerank_lib

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")


def test_tiny_internalize(tiny_workdir):
  config = config_lib.load_config_module(
      os.path.join(CONFIGS, "internalize.py")).get_config("tiny")
  config.sids.embedding = "collaborative"  # as the rl stage test, so its artifacts are shared
  out, _ = runner.run_stage(config, tiny_workdir, "internalize")
  prompt_cfg, _ = rerank_lib.load_rerank_info(out)
  assert not prompt_cfg.reasoning and prompt_cfg.answer_head
  rl_cfg, _ = rerank_lib.load_rerank_info(runner.artifact_dir(tiny_workdir, config, "rl"))
  assert rl_cfg.reasoning
  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f)
  hist = report["history"]
  assert [h["iteration"] for h in hist] == list(range(1, config.internalize.iterations + 1))
  # Under the strict list constraint every rollout is a valid permutation of its slate.
  assert all(h["valid_rate"] == 1.0 for h in hist)
  with open(os.path.join(out, "table.json")) as f:
    table = json.load(f)
  for name in ("rl (reasoning)", "rl (reasoning-free)", "internalized"):
    assert table["seconds"][name] > 0
    for row in (name, name + " (constrained)"):
      assert row in table["rows"] and row in table["diagnostics"]
  # Bypassing the reasoning: the constrained reasoning-free answers are valid lists of at most
  # the list constraint's budget; the reasoning ones are longer.
  diags = table["diagnostics"]
  assert diags["internalized (constrained)"]["valid_rate"] == 1.0
  assert diags["rl (reasoning-free) (constrained)"]["valid_rate"] == 1.0
  assert (diags["rl (reasoning-free) (constrained)"]["mean_response_length"]
          < diags["rl (reasoning) (constrained)"]["mean_response_length"])
  assert np.isfinite(report["per_slate"]["internalized"]["decode_ms_per_slate"])
  # Paired differences of the internalized rows against both RL rows, free and constrained.
  assert set(table["paired"]) == {
      f"internalized{m} vs rl ({kind}){m}" for m in ("", " (constrained)")
      for kind in ("reasoning", "reasoning-free")}
  pair = table["paired"]["internalized (constrained) vs rl (reasoning) (constrained)"]["R@1"]
  want = (table["rows"]["internalized (constrained)"]["R@1"]["mean"]
          - table["rows"]["rl (reasoning) (constrained)"]["R@1"]["mean"])
  assert abs(pair["diff"] - want) < 1e-9 and pair["diff_lo"] <= pair["diff"] <= pair["diff_hi"]


def test_a_budget_below_the_ranking_is_a_clear_error(tiny_workdir):
  config = config_lib.load_config_module(
      os.path.join(CONFIGS, "internalize.py")).get_config("tiny")
  config.sids.embedding = "collaborative"
  config.internalize.max_new_tokens = 20
  with pytest.raises(UserError, match="max_new_tokens=20 is below the .* tokens of a ranking"):
    runner.run_stage(config, tiny_workdir, "internalize")
