"""The RL driver on the toy model that answers under the slate constraint: updates are applied
and move the parameters, and a resumed run keeps the KL reference at the starting policy."""

import os
import shutil
import types

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gr2_jax.parallel import runtime
from gr2_jax.rl import loop
from tests.rerank import toy

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
  return toy.memorise(str(tmp_path_factory.mktemp("tok")))


def _data(n=4):
  slates = {"history": np.array([[-1, 0]] * n), "slate": np.array([[1, 2, 3]] * n),
            "target_index": np.array([1] * n), "target": np.array([2] * n),
            "grades": np.array([[0, 2, 1]] * n), "labels": np.array([[0, 1, 1]] * n)}
  return {"train": slates, "items": toy.ITEMS, "users": None}


def _section(**overrides):
  from gr2_jax import config_lib
  c = config_lib.load_config_module(os.path.join(CONFIGS, "rl.py")).get_config("tiny").rl
  c.update(dict(group_size=4, rollout_prompts=3, train_groups=2, max_new_tokens=64,
                rollout_batch=12, iterations=2, minibatches=2, checkpoint_every=1, eval_every=0,
                temperature=1.0, learning_rate=1e-3, lr_warmup_steps=0))
  c.update(overrides)
  return c


def _run(memorised, workdir, c):
  model, tok = memorised
  graphdef, state = nnx.split(model)
  fresh = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))  # the step donates its state
  ctx = types.SimpleNamespace(path=lambda *p: os.path.join(workdir, *p))
  return loop.train_policy(ctx, c, "train", fresh, tok, _data(), toy.SIDS, toy.PROMPT,
                           runtime.for_devices(None, num_devices=1))


def _params(model):
  return jax.tree.leaves(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model))))


@pytest.mark.parametrize("algorithm", ["dapo", "gspo", "dr_grpo"])
def test_updates_are_applied_and_move_the_parameters(memorised, tmp_path, algorithm):
  before = _params(memorised[0])
  model, report = _run(memorised, str(tmp_path), _section(algorithm=algorithm))
  applied = [h["applied_updates"] for h in report["history"]]
  assert sum(applied) >= 1, report["history"]
  assert report["history"][0]["valid_rate"] > 0  # the starting policy answers
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(_params(model), before))
  assert moved > 1e-6
  alg = report["algorithm"]
  assert alg["policy_loss"] == ("gspo" if algorithm == "gspo" else "ppo_clip")
  assert alg["dynamic_sampling"] == (algorithm == "dapo") and alg["kl_beta"] == 0.0
  assert "kl_ref" not in report["history"][0]


def test_resumed_grpo_keeps_the_kl_reference_at_the_starting_policy(memorised, tmp_path):
  c = _section(algorithm="grpo")  # kl_beta 0.04
  workdir = str(tmp_path)
  _, first = _run(memorised, workdir, c)
  kl = [h["kl_ref"] for h in first["history"]]
  # The first iteration's update moved the policy (the second one's steps may all be skipped
  # for want of signal: whether its sampled groups score alike depends on the CPU's rounding),
  # so the second iteration's policy has left the starting one: its KL is no longer ~0.
  assert first["history"][0]["applied_updates"] >= 1, first["history"]
  assert kl[1] > 1e-6, kl
  # As if the run died before its last checkpoint: resume from iteration 1.
  shutil.rmtree(os.path.join(workdir, "train", "ckpt", "2"))
  _, again = _run(memorised, workdir, c)
  assert again["resumed_from"] == 1
  # The same rollouts against the same reference (the starting policy, not the restored one,
  # whose first KL would be exactly 0) give the same KL.
  assert again["history"][1]["kl_ref"] == pytest.approx(kl[1], rel=1e-4)


def test_contexts_replace_the_history_in_the_rollouts(memorised, tmp_path):
  """`train_policy(contexts=...)`: the rollout prompts show each slate's text in place of its
  history (longer prompts for a long text), and the time to write them is reported apart."""
  c = _section(algorithm="dapo", iterations=1)
  _, plain = _run(memorised, str(tmp_path / "plain"), c)
  seen = []

  def contexts(slates):
    seen.append(len(slates["slate"]))
    return ["likes dramas of the nineties " * 8] * len(slates["slate"])

  model, tok = memorised
  graphdef, state = nnx.split(model)
  fresh = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
  ctx = types.SimpleNamespace(path=lambda *p: os.path.join(str(tmp_path / "ctx"), *p))
  _, summarised = loop.train_policy(ctx, c, "train", fresh, tok, _data(), toy.SIDS, toy.PROMPT,
                                    runtime.for_devices(None, num_devices=1), contexts=contexts)
  assert seen == [c.rollout_prompts]  # once per iteration, for the iteration's slates
  long, short = summarised["history"][0], plain["history"][0]
  assert long["prompt_tokens"] > short["prompt_tokens"] + 20
  assert long["context_seconds"] > 0 and "context_seconds" not in short
  assert summarised["context_seconds"] == long["context_seconds"]


def test_skipped_steps_are_counted_by_their_reason():
  ro = types.SimpleNamespace(omega=np.array([True, False]))
  steps = [{"skipped": 0.0, "signal_tokens": 40.0}, {"skipped": 1.0, "signal_tokens": 0.0},
           {"skipped": 1.0, "signal_tokens": 12.0}]
  assert loop.skip_reasons(ro, steps) == {"no_signal_or_variance": 1, "non_finite": 1}
  # No kept group: every row is masked filler, so every step has no signal.
  filler = [{"skipped": 1.0, "signal_tokens": 0.0}] * 2
  assert loop.skip_reasons(ro, filler) == {"no_signal_or_variance": 2}
  none_valid = types.SimpleNamespace(omega=np.array([False, False]))
  assert loop.skip_reasons(none_valid, steps) == {"all_invalid": 2}
  assert loop.skip_reasons(ro, steps[:1]) == {}
