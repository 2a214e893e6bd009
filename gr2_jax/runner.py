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
import time

from absl import logging as absl_logging

from gr2_jax import config_lib
from gr2_jax import stages as stages_lib

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


def fingerprint(config, stage):
  """Hash of the stage's config section and, recursively, of its inputs' fingerprints."""
  payload = {
      "stage": stage,
      "version": stages_lib.VERSIONS.get(stage, 1),
      "section": config_lib.to_plain(config[stage]),
      "inputs": {dep: fingerprint(config, dep) for dep in stages_lib.REQUIRES[stage]},
  }
  blob = json.dumps(payload, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:12]


def artifact_dir(workdir, config, stage):
  return os.path.join(workdir, stage, fingerprint(config, stage))


def is_done(path):
  return os.path.isfile(os.path.join(path, DONE_FILE))


def read_summary(path):
  with open(os.path.join(path, DONE_FILE)) as f:
    return json.load(f)["summary"]


def _write_json_atomic(path, obj):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


class QuietLibraries(logging.Filter):
  """Drops INFO records that libraries log through absl (orbax logs every save step by step)."""

  PREFIXES = ("orbax", "tensorflow_datasets", "etils", "grain")

  def filter(self, record):
    if record.levelno > logging.INFO:
      return True
    parts = os.path.normpath(record.pathname).split(os.sep)
    return not any(part.startswith(self.PREFIXES) for part in parts[:-1])


class _StageLog:
  """Copies log records to `<artifact>/log.txt` while a stage runs."""

  def __init__(self, path):
    self.handler = logging.FileHandler(path)
    self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    self.handler.addFilter(QuietLibraries())

  def __enter__(self):
    absl_logging.get_absl_logger().addHandler(self.handler)

  def __exit__(self, *exc):
    absl_logging.get_absl_logger().removeHandler(self.handler)
    self.handler.close()


def run_stage(config, workdir, stage, rerun=False):
  """Ensures the artifact of `stage` exists under `workdir`; returns its folder and summary."""
  inputs = {}
  for dep in stages_lib.REQUIRES[stage]:
    inputs[dep], _ = run_stage(config, workdir, dep)
  out_dir = artifact_dir(workdir, config, stage)
  if is_done(out_dir) and not rerun:
    absl_logging.info("[%s] reusing %s", stage, out_dir)
    return out_dir, read_summary(out_dir)
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
  module = importlib.import_module(f"gr2_jax.stages.{stage}")
  ctx = StageContext(name=stage, config=config, section=config[stage], workdir=workdir,
                     out_dir=out_dir, inputs=inputs)
  start = time.time()
  with _StageLog(os.path.join(out_dir, "log.txt")):
    absl_logging.info("[%s] running -> %s", stage, out_dir)
    summary = module.run(ctx) or {}
    elapsed = time.time() - start
    absl_logging.info("[%s] finished in %.1fs", stage, elapsed)
  _write_json_atomic(done_path, {
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
  return out_dir, summary
