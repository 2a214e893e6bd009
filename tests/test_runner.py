"""The runner: upstream stages run first, artifacts are keyed by config, finished ones reused."""

import json
import os

from gr2_jax import config_lib
from gr2_jax import runner
from tests.data.test_sources import write_logs

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _data_config(tmp_path, **overrides):
  config = config_lib.load_config_module(os.path.join(CONFIGS, "data.py")).get_config("tiny")
  ipath, mpath = write_logs(tmp_path)
  config.data.source = "files"
  config.data.interactions_path = ipath
  config.data.items_path = mpath
  config.data.min_history = 3
  for k, v in overrides.items():
    config.data[k] = v
  return config


def test_fingerprint_follows_config_and_inputs(tmp_path):
  a = _data_config(tmp_path)
  b = _data_config(tmp_path, max_history=7)
  assert runner.fingerprint(a, "data") != runner.fingerprint(b, "data")
  assert runner.fingerprint(a, "data") == runner.fingerprint(_data_config(tmp_path), "data")


def test_stage_runs_once_and_is_reused(tmp_path):
  config = _data_config(tmp_path)
  workdir = str(tmp_path / "w")
  out, summary = runner.run_stage(config, workdir, "data")
  assert runner.is_done(out)
  assert summary["users"] == 30 and summary["items"] == 40
  periods = summary["periods"]
  assert sum(p["interactions"] for p in (periods[k] for k in
                                         ("legacy", "train", "validation", "test"))) == 900
  with open(os.path.join(out, "done.json")) as f:
    first = json.load(f)["finished_at"]
  os.utime(os.path.join(out, "done.json"))
  out2, summary2 = runner.run_stage(config, workdir, "data")
  assert out2 == out and summary2 == summary
  with open(os.path.join(out, "done.json")) as f:
    assert json.load(f)["finished_at"] == first
  # Another config gets another folder; the first artifact stays.
  other, _ = runner.run_stage(_data_config(tmp_path, max_history=7), workdir, "data")
  assert other != out and runner.is_done(out) and runner.is_done(other)


def test_unfinished_artifact_is_rerun(tmp_path):
  config = _data_config(tmp_path)
  workdir = str(tmp_path / "w")
  out, _ = runner.run_stage(config, workdir, "data")
  os.remove(os.path.join(out, "done.json"))  # as if the run had crashed before finishing
  out2, _ = runner.run_stage(config, workdir, "data")
  assert out2 == out and runner.is_done(out)


def test_library_info_logs_are_filtered_but_warnings_kept():
  import logging
  quiet = runner.QuietLibraries()

  def record(level, path):
    return logging.LogRecord("absl", level, path, 1, "msg", None, None)

  orbax = "/usr/lib/python3.11/site-packages/orbax/checkpoint/_src/checkpointers/async.py"
  assert not quiet.filter(record(logging.INFO, orbax))
  assert quiet.filter(record(logging.WARNING, orbax))
  assert quiet.filter(record(logging.INFO, "/work/main/gr2_jax/stages/legacy.py"))


def test_stage_presets_stay_with_their_stage():
  configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  load = lambda name: config_lib.load_config_module(os.path.join(configs, f"{name}.py"))
  # rl.py:ablation must not pick sids.py:ablation (another pipeline); tiny applies everywhere.
  ablation = load("rl").get_config("ablation")
  assert ablation.sids.to_dict() == load("sids").section("default").to_dict()
  assert ablation.rl.variants
  tiny = load("rl").get_config("tiny")
  assert tiny.sids.to_dict() == load("sids").section("tiny").to_dict()
  assert tiny.midtrain.to_dict() == load("midtrain").section("tiny").to_dict()
  # full applies to the stages that have it (midtrain's caption phase) and leaves the others.
  full = load("rl").get_config("full")
  assert full.midtrain.caption_steps == load("midtrain").section("full").caption_steps > 0
  assert full.sft.to_dict() == load("sft").section("default").to_dict()
  # smollm2: the pretrained base and its prompt in every model stage, the data stages unchanged.
  smol = load("rl").get_config("smollm2")
  assert smol.midtrain.gguf == "smollm2" and smol.sft.frozen_layers == smol.rl.frozen_layers > 0
  assert smol.traces.prompt.answer_format == "positions"
  assert "title" in smol.traces.prompt.item_fields
  for stage in ("data", "legacy", "sids"):
    assert smol[stage].to_dict() == load(stage).section("default").to_dict(), stage
