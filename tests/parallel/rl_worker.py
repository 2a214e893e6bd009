"""One process of the two-process RL check (tests/parallel/test_multiprocess.py): the RL loop
(`rl.loop.train_policy`, the rl stage's iterations) on the toy re-ranker over the 8-device
global mesh, then process 0 writes the history and the trained parameters.

  python -m tests.parallel.rl_worker OUT_DIR [--coordinator_address=... --num_processes=2
      --process_id=I]
"""

import json
import os
import sys
import types

import numpy as np


def main(argv):
  out_dir = argv[1]
  flags = dict(a[2:].split("=", 1) for a in argv[2:])
  from gr2_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(flags.get("coordinator_address"),
                         int(flags["num_processes"]) if "num_processes" in flags else None,
                         int(flags["process_id"]) if "process_id" in flags else None,
                         heartbeat_s=30)
  run(out_dir)
  distributed.finished()


def run(out_dir):
  """The RL loop over all devices of the run; process 0 writes report.json and params.npz."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from gr2_jax import config_lib  # pylint: disable=g-import-not-at-top
  from gr2_jax.parallel import runtime  # pylint: disable=g-import-not-at-top
  from gr2_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from gr2_jax.rl import loop  # pylint: disable=g-import-not-at-top
  from tests.rerank import toy  # pylint: disable=g-import-not-at-top

  # Every process memorises the same toy model on its own first device (deterministic).
  model, tok = toy.memorise(os.path.join(out_dir, f"tok{jax.process_index()}"))
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  c = config_lib.load_config_module(os.path.join(repo, "configs", "rl.py")).get_config(
      "tiny").rl
  c.update(dict(group_size=4, rollout_prompts=4, train_groups=2, max_new_tokens=64,
                rollout_batch=16, iterations=2, minibatches=2, checkpoint_every=1,
                eval_every=0, temperature=1.0, learning_rate=1e-3, lr_warmup_steps=0,
                algorithm="dapo"))
  n = 8
  slates = {"history": np.array([[-1, 0]] * n), "slate": np.array([[1, 2, 3]] * n),
            "target_index": np.array([1] * n), "target": np.array([2] * n),
            "grades": np.array([[0, 2, 1]] * n), "labels": np.array([[0, 1, 1]] * n)}
  data = {"train": slates, "items": toy.ITEMS, "users": None}
  rt = runtime.for_devices(None)
  ctx = types.SimpleNamespace(path=lambda *p: os.path.join(out_dir, "rl", *p))
  with rt.activate():
    model = rt.place(model)
    model, report = loop.train_policy(ctx, c, "train", model, tok, data, toy.SIDS, toy.PROMPT,
                                      rt)
    params = sharding.to_host(jax.tree.map(lambda x: x, nnx.to_pure_dict(nnx.state(model))))
  if jax.process_index() == 0:
    np.savez(os.path.join(out_dir, "params.npz"),
             **{f"p{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))})
    with open(os.path.join(out_dir, "report.json"), "w") as f:
      json.dump({"history": report["history"], "processes": jax.process_count(),
                 "devices": jax.device_count()}, f)


if __name__ == "__main__":
  main(sys.argv)
