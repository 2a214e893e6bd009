"""Runs a stage and, first, every stage whose artifact it needs and the workdir lacks.

Workdir layout: `<workdir>/<stage>/<fingerprint>/`, one folder per (stage, config). The
fingerprint hashes the stage's config section and the fingerprints of its inputs, so an
artifact made under another config is never picked up by mistake. A folder counts as finished
only once `done.json` is written, last; an unfinished folder is resumed by the next run (stages
that train keep their checkpoints inside it).
"""

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time

from absl import logging as absl_logging
import jax

from gr2_jax import config_lib
from gr2_jax.errors import UserError
from gr2_jax import stages as stages_lib
from gr2_jax.parallel import distributed

DONE_FILE = "done.json"


@dataclasses.dataclass
class StageContext:
  """What a stage sees: its config section, its output folder and its inputs' folders."""
  name: str
  config: object  # the full composed ConfigDict
  section: object  # config[name]
  workdir: str
  out_dir: str
  inputs: dict  # input stage name -> its artifact folder

  def path(self, *parts):
    return os.path.join(self.out_dir, *parts)

  def input_path(self, stage, *parts):
    return os.path.join(self.inputs[stage], *parts)

  # Files of the artifact other than checkpoints: written by process 0 only (every process of
  # a multi-host run computes the same thing), atomically.

  def write_text(self, name, text):
    if jax.process_index() == 0:
      _write_atomic(self.path(name), text)

  def write_json(self, name, obj):
    self.write_text(name, json.dumps(obj, indent=2))

  def copy_in(self, src, name=None):
    if jax.process_index() == 0:
      shutil.copy(src, self.path(name or os.path.basename(src)))

  def sync(self, name):
    """Waits until every process gets here (after process 0 wrote files all of them read)."""
    distributed.barrier(f"{self.name}/{os.path.basename(self.out_dir)}/{name}")


def fingerprint(config, stage):
  """Hash of the stage's config section and, recursively, of its inputs' fingerprints."""
  payload = {
      "stage": stage,
      "version": stages_lib.VERSIONS.get(stage, 1),
      "section": config_lib.to_plain(config[stage]),
      "inputs": {dep: fingerprint(config, dep) for dep in stages_lib.REQUIRES[stage]},
  }
  numerics = _numerics(config)
  if numerics and stage in stages_lib.MODEL_STAGES:
    # The runtime's dtypes change a model stage's results; the mesh, rules and remat do not.
    payload["numerics"] = numerics
  blob = json.dumps(payload, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:12]


def _numerics(config):
  """The runtime's non-default dtypes ({} for float32 throughout: old fingerprints hold)."""
  rt = config.get("runtime") if hasattr(config, "get") else None
  if rt is None:
    return {}
  return {k: rt[k] for k in ("dtype", "param_dtype") if rt.get(k, "float32") != "float32"}


def artifact_dir(workdir, config, stage):
  return os.path.join(workdir, stage, fingerprint(config, stage))


def is_done(path):
  return os.path.isfile(os.path.join(path, DONE_FILE))


def read_summary(path):
  with open(os.path.join(path, DONE_FILE)) as f:
    return json.load(f)["summary"]


def _write_atomic(path, text):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _write_json_atomic(path, obj):
  _write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


class QuietLibraries(logging.Filter):
  """Drops INFO records that libraries log through absl (orbax logs every save step by step)."""

  PREFIXES = ("orbax", "tensorflow_datasets", "etils", "grain")

  def filter(self, record):
    if record.levelno > logging.INFO:
      return True
    parts = os.path.normpath(record.pathname).split(os.sep)
    return not any(part.startswith(self.PREFIXES) for part in parts[:-1])


class _StageLog:
  """Copies log records to `<artifact>/log.txt` while a stage runs (when `enabled`)."""

  def __init__(self, path, enabled=True):
    self.handler = None
    if enabled:
      self.handler = logging.FileHandler(path)
      self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
      self.handler.addFilter(QuietLibraries())

  def __enter__(self):
    if self.handler is not None:
      absl_logging.get_absl_logger().addHandler(self.handler)

  def __exit__(self, *exc):
    if self.handler is not None:
      absl_logging.get_absl_logger().removeHandler(self.handler)
      self.handler.close()


def run_stage(config, workdir, stage, rerun=False):
  """Ensures the artifact of `stage` exists under `workdir`; returns its folder and summary.

  In a multi-process run (gr2_jax.parallel.distributed) every process calls this with the same
  config. A model stage runs on every process (its arrays span all of them); any other stage
  runs on process 0 while the rest wait. Process 0 alone writes the run's files (config.json,
  log.txt, done.json, the `latest` link), and done.json only once every process has finished.
  """
  inputs = {}
  for dep in stages_lib.REQUIRES[stage]:
    inputs[dep], _ = run_stage(config, workdir, dep)
  out_dir = artifact_dir(workdir, config, stage)
  if is_done(out_dir) and not rerun:
    absl_logging.info("[%s] reusing %s", stage, out_dir)
    return out_dir, read_summary(out_dir)
  lead = jax.process_index() == 0
  everyone = stage in stages_lib.ALL_PROCESS_STAGES or jax.process_count() == 1
  tag = f"{stage}/{os.path.basename(out_dir)}"
  if lead:
    os.makedirs(out_dir, exist_ok=True)
    done_path = os.path.join(out_dir, DONE_FILE)
    if os.path.exists(done_path):
      os.remove(done_path)
    _write_json_atomic(os.path.join(out_dir, "config.json"), {
        "stage": stage,
        "fingerprint": os.path.basename(out_dir),
        "section": config_lib.to_plain(config[stage]),
        "inputs": inputs,
    })
  distributed.barrier(f"{tag}/start")
  summary = {}
  if lead and not everyone:
    # Process 0 runs the stage in a child process of its own: a single-process JAX runtime,
    # whose checkpoints (orbax) and computations do not wait for the other processes.
    _run_in_child(config, workdir, stage)
  elif everyone:
    module = importlib.import_module(f"gr2_jax.stages.{stage}")
    ctx = StageContext(name=stage, config=config, section=config[stage], workdir=workdir,
                       out_dir=out_dir, inputs=inputs)
    start = time.time()
    with _StageLog(os.path.join(out_dir, "log.txt"), enabled=lead):
      absl_logging.info("[%s] running -> %s", stage, out_dir)
      summary = module.run(ctx) or {}
      elapsed = time.time() - start
      absl_logging.info("[%s] finished in %.1fs", stage, elapsed)
  distributed.barrier(f"{tag}/finished")
  if lead and everyone:
    _write_json_atomic(os.path.join(out_dir, DONE_FILE), {
        "stage": stage,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "wall_seconds": round(elapsed, 2),
        "summary": summary,
    })
    latest = os.path.join(workdir, stage, "latest")
    try:
      if os.path.islink(latest) or os.path.exists(latest):
        os.remove(latest)
      os.symlink(os.path.basename(out_dir), latest)
    except OSError:
      pass
  distributed.barrier(f"{tag}/recorded")
  if not everyone:  # the child's done.json
    summary = read_summary(out_dir)
  return out_dir, summary


def _run_in_child(config, workdir, stage):
  """Runs `stage` (its inputs done) in a fresh single-process `python -m gr2_jax.runner`,
  which writes the artifact and done.json."""
  path = os.path.join(workdir, f".{stage}.config.json")
  _write_atomic(path, config.to_json())
  env = {k: v for k, v in os.environ.items() if not k.startswith("GR2_")}
  cmd = [sys.executable, "-m", "gr2_jax.runner", path, workdir, stage]
  absl_logging.info("[%s] process 0 runs it alone: %s", stage, " ".join(cmd))
  code = subprocess.call(cmd, env=env)
  if code != 0 or not is_done(artifact_dir(workdir, config, stage)):
    raise UserError(f"stage {stage} failed in process 0's child (exit status {code}); its log "
                    "is above")


def _child_main(argv):
  """`python -m gr2_jax.runner CONFIG_JSON WORKDIR STAGE` (see `_run_in_child`)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path, workdir, stage = argv[1:4]
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  absl_logging.use_absl_handler()
  absl_logging.set_verbosity(absl_logging.INFO)
  absl_logging.get_absl_handler().addFilter(QuietLibraries())
  try:
    run_stage(config, workdir, stage)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  _child_main(sys.argv)
