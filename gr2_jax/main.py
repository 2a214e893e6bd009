"""Entry point: `python -m gr2_jax.main --config=configs/<stage>.py[:preset] --workdir=DIR`.

Runs the stage named by the config file and, first, every earlier stage whose artifact the
workdir lacks. Mistakes a user can make (missing config file, unknown preset or key, bad
data) end with one line on stderr and exit status 2.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import jax

from gr2_jax import config_lib
from gr2_jax import runner
from gr2_jax.errors import UserError
from gr2_jax.parallel import distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Stage config file, optionally with a preset: configs/rl.py:tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for every stage's artifacts.")
_RERUN = flags.DEFINE_bool(
    "rerun", False, "Recompute the requested stage even if its artifact is complete.")
# Multi-host runs (gr2_jax.parallel.distributed; launch/ has the TPU VM and GKE commands).
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for a run of several processes "
    "(else GR2_COORDINATOR_ADDRESS, or what a TPU slice or SLURM job sets).")
_CLUSTER = flags.DEFINE_bool(
    "distributed", False, "Join the processes of a cluster JAX finds by itself (the workers of "
    "a TPU VM slice; launch/tpu_vm.sh passes it).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")
_DIST_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout_s", 300, "Seconds to wait for every process to join the run.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 100, "Seconds without a peer's heartbeat before the run ends.")


def _config_arg(argv):
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _override_keys(argv):
  for arg in argv:
    if arg.startswith("--config."):
      yield arg[len("--config."):].split("=", 1)[0]


def _check_override(config, key):
  node = config
  parts = key.split(".")
  for depth, part in enumerate(parts):
    keys = sorted(node.keys()) if hasattr(node, "keys") else []
    if part not in keys:
      where = ".".join(parts[:depth]) or "the config"
      raise UserError(f"unknown config key {key!r}: {where} has no field {part!r}; "
                      f"valid fields: {', '.join(keys)}")
    node = node[part]


def precheck(argv):
  """Validates --config (file, preset, override keys) so mistakes end in one clear line."""
  value = _config_arg(argv)
  if value is None:
    raise UserError("missing --config=configs/<stage>.py[:preset]")
  path, _, preset = value.partition(":")
  if not os.path.isfile(path):
    folder = os.path.dirname(path) or "."
    choices = sorted(f for f in os.listdir(folder) if f.endswith(".py")
                     and not f.startswith("_")) if os.path.isdir(folder) else []
    raise UserError(f"config file {path} does not exist; valid configs in {folder}: "
                    f"{', '.join(choices) or 'none'}")
  module = config_lib.load_config_module(path)
  config = module.get_config(preset or None)
  for key in _override_keys(argv):
    _check_override(config, key)


def parse_flags(argv):
  try:
    precheck(argv[1:])
    return flags.FLAGS(argv)
  except (UserError, flags.Error) as e:
    print(f"error: {e}".splitlines()[0], file=sys.stderr)
    sys.exit(2)


def main(argv):
  del argv
  if not _WORKDIR.value:
    print("error: missing --workdir=DIR (the folder for the pipeline's artifacts)",
          file=sys.stderr)
    sys.exit(2)
  logging.get_absl_handler().addFilter(runner.QuietLibraries())
  config = _CONFIG.value
  workdir = os.path.abspath(_WORKDIR.value)
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           cluster=_CLUSTER.value, timeout_s=_DIST_TIMEOUT.value,
                           heartbeat_s=_HEARTBEAT.value)
    if jax.process_index() != 0:
      # Logs, tables and artifacts come from process 0; the others speak only of problems.
      logging.set_verbosity(logging.WARNING)
      sys.stdout = open(os.devnull, "w")  # pylint: disable=consider-using-with
    os.makedirs(workdir, exist_ok=True)
    runner.run_stage(config, workdir, config.stage, rerun=_RERUN.value)
    distributed.finished()
  except UserError as e:
    logging.flush()
    # Several processes: one line here and on every peer, and it does not return.
    distributed.report_failure(str(e))
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except Exception as e:  # pylint: disable=broad-exception-caught
    if jax.process_count() == 1:
      raise
    logging.exception("process %d failed", jax.process_index())
    distributed.report_failure(f"{type(e).__name__}: {distributed.first_line(e)}")

if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
