"""The tiny RL stage end to end on the tiny SFT artifact: iterations logged with diagnostics,
the final table with SFT and RL rows, resume after the last checkpoint, and config errors.
Updates that move the policy, and the algorithm variants, are tested on the toy model that
answers (`test_rl_driver.py`): the tiny SFT model's answers are not valid yet."""

import json
import os
import shutil

from flax import nnx
import jax
import numpy as np
import pytest

from gr2_jax import config_lib
from gr2_jax import runner
from gr2_jax.data import slates as slates_lib
from gr2_jax.errors import UserError
from gr2_jax.rankers import scores as scores_lib
from gr2_jax.eval import compare
from gr2_jax.models import artifact

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")


def _config(preset="tiny", **overrides):
  config = config_lib.load_config_module(os.path.join(CONFIGS, "rl.py")).get_config(preset)
  config.sids.embedding = "collaborative"  # as the sft stage test, so its artifacts are shared
  for k, v in overrides.items():
    config.rl[k] = v
  return config


@pytest.fixture(scope="module")
def rl_run(tiny_workdir):
  config = _config()
  out, summary = runner.run_stage(config, tiny_workdir, "rl")
  return config, out, summary


def test_tiny_rl_end_to_end(rl_run, tiny_workdir):
  config, out, summary = rl_run
  c = config.rl
  for f in ("model_config.json", "prompt.json", "sid_table.json", "table.json", "table.md",
            "report.json"):
    assert os.path.isfile(os.path.join(out, f)), f
  with open(os.path.join(out, "train", "tb", "metrics.jsonl")) as f:
    lines = [json.loads(l) for l in f]
  train = [l for l in lines if l["kind"] == "train"]
  assert [l["step"] for l in train] == list(range(1, c.iterations + 1))
  for key in ("reward", "reward/rank", "reward/format", "valid_rate", "groups_kept",
              "response_length", "entropy", "identity_rate", "kendall_tau", "skipped_updates",
              "rollout_tokens_per_sec"):
    assert key in train[0], key
  evals = [l for l in lines if l["kind"] == "eval"]
  assert [l["step"] for l in evals] == list(range(c.eval_every, c.iterations, c.eval_every)) + [
      c.iterations]
  for key in ("R@1", "legacy_R@1", "N@5", "valid_rate", "identity_rate", "kendall_tau"):
    assert key in evals[0], key
  with open(os.path.join(out, "table.json")) as f:
    table = json.load(f)
  models = {"sft", "rl", "sft (constrained)", "rl (constrained)"}
  assert set(table["rows"]) == set(compare.BASELINES) | models
  # The best model row against the best learned baseline, on the same slates.
  best = table["best_vs_best"]
  r1 = {name: table["rows"][name]["R@1"]["mean"] for name in table["rows"]}
  assert r1[best["llm"]] == max(r1[m] for m in models)
  assert r1[best["baseline"]] == max(r1[b] for b in scores_lib.RANKERS)
  assert best["diff"] == pytest.approx(r1[best["llm"]] - r1[best["baseline"]])
  assert table["slates"] == c.eval_examples
  # The baselines also on every test slate of the split.
  every = table["baselines_all_slates"]
  assert every["slates"] > c.eval_examples
  assert set(every["rows"]) == set(compare.BASELINES)
  test = slates_lib.load_split(runner.artifact_dir(tiny_workdir, config, "legacy"), "test")
  assert every["slates"] == len(test["slate"])
  # The legacy order's R@1 is the share of slates whose target the legacy ranker put first.
  assert every["rows"]["legacy"]["R@1"]["mean"] == pytest.approx(
      float(np.mean(test["target_index"] == 0)))
  for name in models:
    d = table["diagnostics"][name]
    assert d["num_rollouts"] == c.eval_examples
    assert d["invalid_as_legacy"] == d["num_rollouts"] - d["num_valid"]
    assert "lift" in table["rows"][name]
  # Every update is either applied or skipped with a reason; a skipped one leaves the policy
  # bit-identical, so the RL model equals the SFT model exactly when nothing was applied.
  updates = c.iterations * c.ppo_epochs * c.minibatches
  applied = sum(l["applied_updates"] for l in train)
  assert applied + sum(summary["skipped_updates"].values()) == updates
  sft, _ = artifact.load_model_and_tokenizer(summary["sft"])
  rl, _ = artifact.load_model_and_tokenizer(out)
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
      jax.tree.leaves(nnx.state(sft)), jax.tree.leaves(nnx.state(rl))))
  assert (diff > 0) == (applied > 0), (diff, applied, summary["skipped_updates"])


def test_killed_run_resumes_from_its_last_checkpoint(tiny_workdir, rl_run):
  config, out, _ = rl_run
  n = config.rl.iterations
  ckpt = os.path.join(out, "train", "ckpt")
  steps = sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())
  assert steps[-1] == n
  # As if the run died after the previous checkpoint: the last one never got written.
  shutil.rmtree(os.path.join(ckpt, str(n)))
  _, summary = runner.run_stage(config, tiny_workdir, "rl", rerun=True)
  assert summary["resumed_from"] == steps[-2]
  with open(os.path.join(out, "train", "tb", "metrics.jsonl")) as f:
    train = [json.loads(l) for l in f if '"train"' in l]
  # The redone iterations drew the same prompts and samples from the same restored policy.
  redone = train[n:]
  assert [l["step"] for l in redone] == list(range(steps[-2] + 1, n + 1))
  for again in redone:
    first = train[again["step"] - 1]
    for key in ("reward", "valid_rate", "response_length", "entropy"):
      assert again[key] == pytest.approx(first[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("overrides,message", [
    ({"group_size": 1}, "group_size 1 < 2"),
    ({"reward": "ndcg"}, "unknown reward 'ndcg'"),
    ({"algorithm": "ppo"}, "unknown RL algorithm 'ppo'"),
    ({"train_groups": 5}, "train_groups"),
    ({"variants": (("x", "naive", "sorted"),)}, "shuffled or fixed"),
    ({"rollout_prompts": 2, "train_groups": 2}, "rollout_prompts \\(2\\) must exceed"),
    ({"clip_ratio_c": 0.5}, "clip_ratio_c 0.5 must be > 1"),
    ({"init_from": "/nonexistent/opd"}, "holds no model"),
])
def test_bad_config_is_one_clear_error(tiny_workdir, overrides, message):
  with pytest.raises(UserError, match=message):
    runner.run_stage(_config(**overrides), tiny_workdir, "rl")


def test_rl_starts_from_another_artifact(tiny_workdir, rl_run):
  """RL from a given artifact (here the RL model itself, as RL-OPD starts from an opd one):
  its first policy is that model, shown as the "start" row."""
  _, rl_out, _ = rl_run
  config = _config(init_from=rl_out, iterations=1, eval_every=0)
  out, summary = runner.run_stage(config, tiny_workdir, "rl")
  assert summary["sft"] == rl_out
  with open(os.path.join(out, "table.json")) as f:
    table = json.load(f)
  assert "start" in table["rows"] and "sft" not in table["rows"]
  with open(os.path.join(rl_out, "table.json")) as f:
    before = json.load(f)
  # The start row is the earlier run's RL model on the same seeded slates.
  assert table["rows"]["start"]["R@1"]["mean"] == before["rows"]["rl"]["R@1"]["mean"]
