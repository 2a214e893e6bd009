"""Reasoning-free RL pass ("internalisation"): RL from the RL stage's model on the no-reasoning
prompt whose assistant turn opens with the answer's head, so the policy writes only the ranking
(the serving setting); same rewards, guards and rollouts as the RL stage.

  python -m gr2_jax.main --config=configs/internalize.py --workdir=W
  python -m gr2_jax.main --config=configs/internalize.py:tiny --workdir=W

Every field of `configs/rl.py`'s section applies. The final table compares, on the same seeded
test slates, the RL model with its reasoning, the RL model with the reasoning bypassed (before
this pass) and after it, with answer tokens and decode seconds per model; `python -m
gr2_jax.serve --workdir=W` then serves this artifact.
"""

import os

from gr2_jax import config_lib

PRESETS = ("default", "tiny")


def section(preset):
  rl = config_lib.load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "rl.py"))
  c = rl.section("tiny" if preset == "tiny" else "default")
  # The list alone is sampled under the strict list constraint (always a permutation), so the
  # policy itself can be sampled; the budget covers the list with its separators.
  c.temperature = 1.0
  # The tokens the list constraint forces (the rest of a SID once its first code is drawn, the
  # separators, the closing) are fed in chunks of up to this many: one model call per draw.
  c.jump_forward = 8
  # Before the pass: the reasoning model's own rankings (with its reasoning, greedy, slate
  # constraint on) of this many training slates, taught to the reasoning-free prompt by
  # `distill_steps` SFT steps on the list alone (0 = no distillation).
  c.distill_examples = 512
  c.distill_steps = 128
  c.distill_batch = 8
  c.distill_lr = 1e-4
  if preset == "tiny":
    c.distill_examples = 8
    c.distill_steps = 4
    c.distill_batch = 4
    c.max_new_tokens = 128  # ten SIDs of the tiny tokenizer with their separators: ~110 tokens
  else:
    c.max_new_tokens = 128  # ten SIDs with quotes and commas are ~90 tokens
    c.iterations = 12
    c.rollout_batch = 48
    # The decision on the target asks for >= 1,000 test slates; the reasoning model's row
    # decodes ~220 tokens per slate.
    c.eval_examples = 1000
  return c


def get_config(arg=None):
  return config_lib.compose(__file__, arg, PRESETS, section)
