"""On-policy distillation (OPD): a student trained on its own rollouts toward a frozen teacher
(reverse KL, exact over the vocabulary by default) plus the re-ranking reward's group
advantage, with the RL stage's rollouts, rewards and guards.

  python -m gr2_jax.main --config=configs/opd.py --workdir=W                   # pruned student
  python -m gr2_jax.main --config=configs/opd.py:beta_only --workdir=W         # KL alone (A = 0)
  python -m gr2_jax.main --config=configs/opd.py:sft_replacement --workdir=W   # from midtrain
  python -m gr2_jax.main --config=configs/opd.py:tiny --workdir=W

Recipes: `pruned` (default): student = the RL model with only `keep_layers` of its layers
(`every_other`, `first_last:K` or indices), teacher = the full RL model; `sft_replacement`:
student = the mid-trained model, teacher = the RL (or, with teacher="sft", the SFT) model.
Every field of `configs/rl.py`'s section applies (rollouts, budgets, evaluation).
"""

import os

from gr2_jax import config_lib

PRESETS = ("default", "tiny", "beta_only", "sft_replacement")


def section(preset):
  rl = config_lib.load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "rl.py"))
  c = rl.section("tiny" if preset == "tiny" else "default")
  c.algorithm = "opd"
  c.kl_beta = 1.0  # weight of the reverse KL to the teacher
  c.kl_estimator = "full"  # full (exact over the vocabulary) | k1 | k3 (sampled token)
  c.recipe = "pruned"  # pruned | sft_replacement
  c.keep_layers = "every_other"  # the pruned student's layers
  c.teacher = "rl"  # rl | sft: the model the student learns from
  c.learning_rate = 1e-4  # a pruned student starts far from its teacher
  # > 0: the teacher runs on the last `teacher_devices` devices and the student on the others;
  # the teacher's log-probs move to the student's devices (needs kl_estimator k1 or k3).
  c.teacher_devices = 0
  c.eval_batch = 32  # the final table's decode batch: the speed-up is measured at batch 32
  if preset == "beta_only":
    c.advantage = "zero"
  elif preset == "sft_replacement":
    c.recipe = "sft_replacement"
  return c


def get_config(arg=None):
  return config_lib.compose(__file__, arg, PRESETS, section)
