"""Serves a trained re-ranker: `python -m gr2_jax.serve --workdir=W [--port=8000]`.

The model is the workdir's newest finished internalize, rl, opd or sft artifact (or
--model_dir), the item catalogue its data artifact's (or --data_dir). Start-up loads the model
and compiles the re-ranking path for every batch size before the port opens; the log says how
long each took.
"""

import os
import time

from absl import app
from absl import flags
from absl import logging
import uvicorn

from gr2_jax.errors import UserError
from gr2_jax.serve import app as app_lib
from gr2_jax.serve import engine as engine_lib

_DEFAULTS = engine_lib.ServeConfig()  # one place for the serving defaults

flags.DEFINE_string("workdir", None, "Pipeline workdir holding the trained artifacts.")
flags.DEFINE_string("model_dir", None, "Model artifact folder (default: found in --workdir).")
flags.DEFINE_string("data_dir", None, "Data artifact folder (default: <workdir>/data/latest).")
flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on.")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
flags.DEFINE_integer("max_batch", _DEFAULTS.max_batch, "Requests per sampler call.")
flags.DEFINE_float("max_wait_ms", _DEFAULTS.max_wait_ms,
                   "The most a batch waits to fill (for as many requests as the last batch's "
                   "clients and those queued meanwhile).")
flags.DEFINE_bool("prefix_reuse", _DEFAULTS.prefix_reuse,
                  "Prefill each shared prompt prefix once.")
flags.DEFINE_integer("jump_forward", _DEFAULTS.jump_forward,
                     "Forced answer tokens fed per decode step (0: off).")
flags.DEFINE_integer("max_candidates", 0, "Largest K served (0: the workdir's slate size).")
flags.DEFINE_integer("max_prompt_tokens", _DEFAULTS.max_prompt_tokens, "Longest prompt served.")
flags.DEFINE_bool("warmup", True, "Compile the re-ranking path before opening the port.")


def build(argv_flags):
  """(engine, config, start-up report) from parsed flags."""
  f = argv_flags
  t0 = time.time()
  if not f.workdir and not (f.model_dir and f.data_dir):
    raise UserError("pass --workdir, or both --model_dir and --data_dir")
  model_dir = f.model_dir or engine_lib.find_model_dir(f.workdir)
  data_dir = f.data_dir or os.path.join(f.workdir, "data", "latest")
  k = f.max_candidates or (engine_lib.slate_size(f.workdir) if f.workdir else None) or 10
  cfg = engine_lib.ServeConfig(max_batch=f.max_batch, max_wait_ms=f.max_wait_ms,
                               prefix_reuse=f.prefix_reuse, jump_forward=f.jump_forward,
                               max_candidates=int(k),
                               max_prompt_tokens=f.max_prompt_tokens)
  engine = engine_lib.Engine.from_dirs(model_dir, data_dir, cfg)
  report = {"model_dir": model_dir, "load_s": round(time.time() - t0, 1)}
  logging.info("[serve] loaded %s (%d items, K <= %d) in %.1f s", model_dir, len(engine.items),
               k, report["load_s"])
  if f.warmup:
    report["warmup_s"] = round(engine.warmup(), 1)
    logging.info("[serve] compiled batch sizes up to %d in %.1f s", f.max_batch,
                 report["warmup_s"])
  report["startup_s"] = round(time.time() - t0, 1)
  return engine, cfg, report


def main(argv):
  del argv
  try:
    engine, cfg, report = build(flags.FLAGS)
  except UserError as e:
    raise app.UsageError(str(e)) from None
  api = app_lib.create_app(engine, cfg)
  logging.info("[serve] ready in %.1f s on http://%s:%d", report["startup_s"], flags.FLAGS.host,
               flags.FLAGS.port)
  uvicorn.run(api, host=flags.FLAGS.host, port=flags.FLAGS.port, log_level="warning")


if __name__ == "__main__":
  app.run(main)
