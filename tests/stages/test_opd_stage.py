"""The OPD stage on the tiny pipeline: a pruned student distilled from the RL model, its table
beside the teacher's; layer specs; a student with another vocabulary refused."""

import json
import os

from flax import nnx
import jax
import numpy as np
import pytest

from gr2_jax import config_lib
from gr2_jax import runner
from gr2_jax.distill import prune as prune_lib
from gr2_jax.errors import UserError
from gr2_jax.models import qwen3
from gr2_jax.parallel import mesh as mesh_lib
from gr2_jax.models import artifact

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")


def _config(preset="tiny", **overrides):
  config = config_lib.load_config_module(os.path.join(CONFIGS, "opd.py")).get_config(preset)
  config.sids.embedding = "collaborative"  # as the rl stage test, so its artifacts are shared
  for k, v in overrides.items():
    config.opd[k] = v
  return config


def test_layer_specs():
  assert prune_lib.layers_to_keep("every_other", 4) == [0, 2]
  assert prune_lib.layers_to_keep("every_other", 5) == [0, 2, 4]
  assert prune_lib.layers_to_keep("first_last:1", 4) == [0, 3]
  assert prune_lib.layers_to_keep("3,0", 4) == [0, 3]
  for bad in ("first_last:3", "0,9", "0,1,2,3", "half", ""):
    with pytest.raises(UserError):
      prune_lib.layers_to_keep(bad, 4)


def test_pruned_model_equals_the_kept_layers_of_the_teacher():
  cfg = qwen3.get_model_config("tiny", vocab_size=64)
  cfg = type(cfg)(**{**cfg.__dict__, "num_layers": 3})
  teacher = mesh_lib.create_sharded_model(cfg, mesh_lib.single_device_mesh(), seed=1)
  student = prune_lib.prune(teacher, [0, 2])
  t = nnx.to_pure_dict(nnx.state(teacher))
  s = nnx.to_pure_dict(nnx.state(student))
  assert student.cfg.num_layers == 2 and set(s["layers"]) == {0, 1}
  for a, b in zip(jax.tree.leaves(s["layers"][1]), jax.tree.leaves(t["layers"][2])):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(s["embed_tokens"]["embedding"], t["embed_tokens"]["embedding"])


def test_tiny_opd_pruned_student(tiny_workdir):
  config = _config()
  out, summary = runner.run_stage(config, tiny_workdir, "opd")
  c = config.opd
  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f)
  rl_dir = runner.artifact_dir(tiny_workdir, config, "rl")
  teacher, _ = artifact.load_model_and_tokenizer(rl_dir)
  assert report["kept_layers"] == summary["kept_layers"] == prune_lib.layers_to_keep(
      c.keep_layers, teacher.cfg.num_layers)
  student, _ = artifact.load_model_and_tokenizer(out)
  assert student.cfg.num_layers == len(report["kept_layers"]) < teacher.cfg.num_layers
  # The KL to the teacher is logged every iteration and every update is applied or counted.
  curve = report["kl_curve"]
  assert [p["iteration"] for p in curve] == list(range(1, c.iterations + 1))
  assert all(np.isfinite(p["kl_teacher"]) and p["kl_teacher"] >= 0 for p in curve)
  with open(os.path.join(out, "table.json")) as f:
    table = json.load(f)
  for name in ("teacher", "student (before)", "opd"):
    assert name in table["rows"] and table["seconds"][name] > 0
  assert table["decode_speedup"]["teacher"] == pytest.approx(1.0)
  assert set(report["answer_tokens_per_sec"]) == {"teacher", "student (before)", "opd"}
  assert all(v > 0 for v in report["answer_tokens_per_sec"].values())
  assert set(report["share_of_teacher_lift_kept"]) <= {"opd", "opd (constrained)"}
  # The teacher is the RL model, unchanged: its rows equal a fresh evaluation's in the rl table.
  with open(os.path.join(rl_dir, "table.json")) as f:
    rl_table = json.load(f)
  if rl_table["slates"] == table["slates"]:
    assert (table["rows"]["teacher"]["R@1"]["mean"]
            == rl_table["rows"]["rl"]["R@1"]["mean"])


def test_opd_needs_a_known_recipe(tiny_workdir):
  with pytest.raises(UserError, match="recipe"):
    runner.run_stage(_config(recipe="distil"), tiny_workdir, "opd")
