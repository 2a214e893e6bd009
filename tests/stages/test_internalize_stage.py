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


def test_tiny_internalize(tiny_workdir, monkeypatch):
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
  # The distillation before the pass: the reasoning model's valid rankings of 8 training
  # slates, 4 SFT steps; the tiny reasoning model may answer none validly (its explanation's
  # JSON), and then the pass starts from the RL model, without a distilled row.
  d = report["distill"]
  assert d["slates"] == config.internalize.distill_examples == d["examples"] + d["invalid"]
  distilled = d["examples"] > 0
  if distilled:
    assert d["steps"] == config.internalize.distill_steps and np.isfinite(d["final_loss"])
    assert os.path.isdir(os.path.join(out, "distill"))
  assert ("distilled" in table["seconds"]) == distilled
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
  # Paired differences of the internalized rows against both RL rows and the distilled one, and
  # of the distilled rows against the reasoning model, free and constrained.
  pairs = [("internalized", "rl (reasoning)"), ("internalized", "rl (reasoning-free)")]
  if distilled:
    pairs += [("distilled", "rl (reasoning)"), ("internalized", "distilled")]
  assert set(table["paired"]) == {f"{a}{m} vs {b}{m}" for m in ("", " (constrained)")
                                  for a, b in pairs}
  pair = table["paired"]["internalized (constrained) vs rl (reasoning) (constrained)"]["R@1"]
  want = (table["rows"]["internalized (constrained)"]["R@1"]["mean"]
          - table["rows"]["rl (reasoning) (constrained)"]["R@1"]["mean"])
  assert abs(pair["diff"] - want) < 1e-9 and pair["diff_lo"] <= pair["diff"] <= pair["diff_hi"]
  # The distillation targets are kept: a run resumed after a crash (here: the finished stage
  # with its done marker removed) reads them instead of decoding the training slates again.
  assert os.path.exists(os.path.join(out, "distill_targets.npz"))
  os.remove(os.path.join(out, runner.DONE_FILE))
  from gr2_jax.stages import internalize  # pylint: disable=import-outside-toplevel

  def no_decoding(*args, **kwargs):
    raise AssertionError("the distillation targets were decoded again")

  monkeypatch.setattr(internalize, "distill_examples", no_decoding)
  out2, _ = runner.run_stage(config, tiny_workdir, "internalize")
  with open(os.path.join(out2, "report.json")) as f:
    again = json.load(f)["distill"]
  assert out2 == out
  assert {k: again[k] for k in ("slates", "examples", "invalid")} == {
      k: d[k] for k in ("slates", "examples", "invalid")}


def test_a_budget_below_the_ranking_is_a_clear_error(tiny_workdir):
  config = config_lib.load_config_module(
      os.path.join(CONFIGS, "internalize.py")).get_config("tiny")
  config.sids.embedding = "collaborative"
  config.internalize.max_new_tokens = 20
  with pytest.raises(UserError, match="max_new_tokens=20 is below the .* tokens of a ranking"):
    runner.run_stage(config, tiny_workdir, "internalize")


def test_distillation_targets_and_fit(tiny_workdir, tmp_path):
  """Each distillation example is the reasoning-free prompt (head prefilled) followed by the
  teacher prompt's constrained ranking of the slate, written as the strict list constraint's
  own ways (`answer_ways`), the loss on that list only; SFT on them lowers their loss. The
  teacher here is the RL model prompted without reasoning, whose constrained lists are always
  valid (the tiny model's reasoning answers may all be invalid)."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from gr2_jax.data import artifacts  # pylint: disable=import-outside-toplevel
  from gr2_jax.data import slates as slates_lib  # pylint: disable=import-outside-toplevel
  from gr2_jax.parallel import runtime as runtime_lib  # pylint: disable=import-outside-toplevel
  from gr2_jax.stages import internalize  # pylint: disable=import-outside-toplevel
  from gr2_jax.teachers import base  # pylint: disable=import-outside-toplevel
  config = config_lib.load_config_module(
      os.path.join(CONFIGS, "internalize.py")).get_config("tiny")
  config.sids.embedding = "collaborative"
  runner.run_stage(config, tiny_workdir, "rl")
  rl_dir = runner.artifact_dir(tiny_workdir, config, "rl")
  prompt_cfg, sids = rerank_lib.load_rerank_info(rl_dir)
  free_cfg = dataclasses.replace(prompt_cfg, reasoning=False, answer_head=True)
  rt = runtime_lib.for_devices(None, num_devices=1)
  model, tok = rt.load(rl_dir)
  legacy_dir = runner.artifact_dir(tiny_workdir, config, "legacy")
  slates = slates_lib.load_split(legacy_dir, "train", max_examples=4, seed=0)
  data = {"items": artifacts.load_items(runner.artifact_dir(tiny_workdir, config, "data")),
          "users": None}
  examples, report = internalize.distill_examples(
      model, tok, slates, data, sids, free_cfg, free_cfg, max_new_tokens=128, batch_size=4)
  got = rerank_lib.rerank(model, tok, base.examples_from_slates(slates), data["items"], sids,
                          free_cfg, max_new_tokens=128, batch_size=4, constrained=(True,))[True]
  assert got.omega.all() and report == {"slates": 4, "examples": 4, "invalid": 0,
                                        "first_is_shown_first": float(np.mean(got.order[:, 0]
                                                                              == 0))}
  p_ids = rerank_lib.prompt_ids(base.examples_from_slates(slates), data["items"], sids, free_cfg,
                                tok)
  for i, (ids, weights) in enumerate(examples):
    shown = [sids[int(x)] for x in slates["slate"][i]]
    _, ways = rerank_lib.answer_ways(tok, shown, free_cfg.answer_format, tok.im_end_id)
    order = got.order[i]
    want = [t for p in order[:-1] for t in ways[p][1][0]] + list(ways[order[-1]][2][0])
    n = len(p_ids[i])
    assert ids.tolist() == p_ids[i] + want
    assert weights.tolist() == [0.0] * n + [1.0] * len(want)
  # Kept targets read back as written; an empty set too; a damaged file is ignored (None).
  path = str(tmp_path / "targets.npz")
  internalize.save_targets(path, examples, report)
  back, back_report = internalize.load_targets(path)
  assert back_report == report and len(back) == len(examples)
  for (ids, weights), (ids2, weights2) in zip(examples, back):
    assert ids.tolist() == ids2.tolist() and weights.tolist() == weights2.tolist()
  internalize.save_targets(path, [], {"slates": 2, "examples": 0})
  assert internalize.load_targets(path) == ([], {"slates": 2, "examples": 0})
  with open(path, "wb") as f:
    f.write(b"not an npz file")
  assert internalize.load_targets(path) is None
  assert internalize.load_targets(str(tmp_path / "missing.npz")) is None
  c = config.internalize
  c.distill_steps, c.distill_batch, c.distill_lr = 12, 4, 1e-3
  _, fit = internalize.fit_copy(model, examples, c, rt, str(tmp_path / "distill"), tok.pad_id)
  assert fit["steps"] == 12 and fit["final_loss"] < fit["first_loss"]
