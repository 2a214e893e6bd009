"""Composition of stage configs.

A config file `configs/<stage>.py` defines `PRESETS`, `section(preset)` (the stage's own fields)
and `get_config(arg)`, which calls `compose` here. The composed config holds one section per
stage of the pipeline up to the requested one (`config.data`, `config.legacy`, ...), so a single
command line can override any upstream field (`--config.data.max_history=20`). Each upstream
section comes from its own config file: with the same preset for the pipeline-wide presets
(`PIPELINE_PRESETS`) where that file has it, else its default (`rl.py:full` trains from
`midtrain.py:full`); a stage's own presets (`sids.py:ablation`, `rl.py:ablation`,
`eval.py:baselines`) change only that stage.
"""

import importlib.util
import os

import ml_collections

from gr2_jax import stages as stages_lib
from gr2_jax.errors import UserError


# Presets that apply to every stage of a composed pipeline.
PIPELINE_PRESETS = ("default", "tiny", "full", "smollm2")


class ConfigError(UserError):
  """A user-caused configuration problem; printed as one line."""


def parse_preset(arg, presets):
  """Returns the preset named by the `:arg` suffix of --config ('' means default)."""
  preset = (arg or "default").strip()
  if preset not in presets:
    raise ConfigError(
        f"unknown preset {preset!r}; valid presets: {', '.join(presets)}")
  return preset


def load_config_module(path):
  """Imports a config file by path."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path} does not exist")
  name = "gr2_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def compose(config_file, arg, presets, section_fn):
  """Builds the full config for the stage defined by `config_file`."""
  stage = os.path.splitext(os.path.basename(config_file))[0]
  preset = parse_preset(arg, presets)
  cfg = ml_collections.ConfigDict()
  cfg.stage = stage
  cfg.preset = preset
  config_dir = os.path.dirname(os.path.abspath(config_file))
  for dep in stages_lib.transitive_requires(stage):
    module = load_config_module(os.path.join(config_dir, dep + ".py"))
    dep_preset = (preset if preset in PIPELINE_PRESETS and preset in module.PRESETS
                  else "default")
    cfg[dep] = module.section(dep_preset)
  cfg[stage] = section_fn(preset)
  # The model runtime (mesh, rules, numerics) every model stage shares: --config.runtime.*.
  from gr2_jax.parallel import runtime  # pylint: disable=g-import-not-at-top  (imports jax)
  cfg.runtime = runtime.section()
  return cfg


def to_plain(value):
  """ConfigDict -> nested plain dict (JSON-able), other values unchanged."""
  if isinstance(value, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    return {k: to_plain(v) for k, v in sorted(value.items())}
  if isinstance(value, (list, tuple)):
    return [to_plain(v) for v in value]
  return value
