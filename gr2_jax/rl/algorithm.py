"""The RL algorithm between rollouts and the jitted update, behind one typed, frozen config.

reward -> overlong shaping -> group advantages -> dynamic sampling (groups with signal and
reward variance, fixed shapes) -> update rows. The stage only drives: it rolls out, calls
`plan_update` and `update_rows`, and steps the policy.

GRPO, Dr.GRPO, DAPO and GSPO are `AlgorithmConfig` values (`ALGORITHMS`); a config section
names one and may override any field, each field written once here.
"""

import dataclasses
from typing import Optional

import numpy as np

from gr2_jax.errors import UserError
from gr2_jax.rl import advantages as adv_lib
from gr2_jax.rl import learner
from gr2_jax.rl import losses
from gr2_jax.rl.registry import ADVANTAGES
from gr2_jax.rl.registry import KL_ESTIMATORS
from gr2_jax.rl.registry import LOSS_AGGREGATIONS
from gr2_jax.rl.registry import POLICY_LOSSES
from gr2_jax.rl.registry import REWARDS


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
  """One policy-gradient algorithm of the GRPO family (reference values: GRPO's)."""
  advantage: str = "grpo"  # group advantage estimator (`advantages.py`)
  policy_loss: str = "ppo_clip"  # `losses.py`: ppo_clip or gspo
  eps_low: float = 0.2  # ratio clip below 1
  eps_high: float = 0.2  # ratio clip above 1 (DAPO's clip-higher: > eps_low)
  clip_ratio_c: float = 0.0  # dual-clip bound for negative advantages (> 1; 0 = off)
  aggregation: str = "seq_mean_token_mean"  # how token losses become the batch loss
  kl_beta: float = 0.04  # weight of the KL to the starting policy (0 = no reference)
  kl_estimator: str = "k3"
  dynamic_sampling: bool = False  # update only on groups whose rewards vary
  # Soft overlong penalty over the last `overlong_buffer` tokens of the budget (0 = off); an
  # answer cut at the budget always gets the hard penalty.
  overlong_buffer: int = 0

  def validate(self):
    ADVANTAGES.get(self.advantage)
    POLICY_LOSSES.get(self.policy_loss)
    LOSS_AGGREGATIONS.get(self.aggregation)
    problems = []
    if self.kl_estimator == "full":
      if self.policy_loss != "opd":
        problems.append("kl_estimator 'full' (the exact KL over the vocabulary) needs the "
                        "teacher's logits: policy_loss 'opd' only")
    else:
      KL_ESTIMATORS.get(self.kl_estimator)
    if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
      problems.append(f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, "
                      f"{self.eps_high}")
    if self.clip_ratio_c and self.clip_ratio_c <= 1:
      problems.append(f"clip_ratio_c {self.clip_ratio_c} must be > 1 (or 0 = off)")
    if self.kl_beta < 0 or self.overlong_buffer < 0:
      problems.append("kl_beta and overlong_buffer must be >= 0")
    if problems:
      raise UserError("rl algorithm: " + "; ".join(problems))
    return self

  def loss_config(self, max_len, temperature):
    """The static settings of the jitted policy loss."""
    return learner.LossConfig(
        policy_loss=self.policy_loss, eps_low=float(self.eps_low),
        eps_high=float(self.eps_high), clip_ratio_c=float(self.clip_ratio_c),
        aggregation=self.aggregation, kl_beta=float(self.kl_beta),
        kl_estimator=self.kl_estimator, max_len=int(max_len), temperature=float(temperature))


FIELDS = tuple(f.name for f in dataclasses.fields(AlgorithmConfig))

GRPO = AlgorithmConfig()
DR_GRPO = dataclasses.replace(GRPO, advantage="dr_grpo", aggregation="seq_mean_token_sum_norm",
                              kl_beta=0.0)
DAPO = dataclasses.replace(GRPO, eps_high=0.28, aggregation="token_mean", kl_beta=0.0,
                           dynamic_sampling=True, overlong_buffer=64)
GSPO = dataclasses.replace(GRPO, policy_loss="gspo", eps_low=3e-4, eps_high=4e-4, kl_beta=0.0)
# On-policy distillation: the reward's group advantage plus beta x the exact reverse KL to a
# frozen teacher on the student's own rollouts (`losses.opd`); every group trains (the KL is a
# signal even where the rewards do not vary). advantage="zero" is beta-only OPD.
OPD = dataclasses.replace(GRPO, policy_loss="opd", eps_high=0.28, aggregation="token_mean",
                          kl_beta=1.0, kl_estimator="full")
ALGORITHMS = {"grpo": GRPO, "dr_grpo": DR_GRPO, "dapo": DAPO, "gspo": GSPO, "opd": OPD}


def get(name: str) -> AlgorithmConfig:
  """The reference settings of algorithm `name`."""
  if name not in ALGORITHMS:
    raise UserError(f"unknown RL algorithm {name!r}: choose one of {', '.join(sorted(ALGORITHMS))}")
  return ALGORITHMS[name]


def from_section(section) -> AlgorithmConfig:
  """`section.algorithm`'s settings with the section's non-None field overrides, validated."""
  base = get(section.algorithm)
  overrides = {f: section.get(f) for f in FIELDS if section.get(f) is not None}
  return dataclasses.replace(base, **overrides).validate()


def slate_has_signal(reward: str, slates) -> np.ndarray:
  """bool [N]: the slates a reward can rank (a target in the slate; a positive and a negative)."""
  n, k = slates["slate"].shape
  out = REWARDS.get(reward)(np.ones(n, bool), np.tile(np.arange(k), (n, 1)),
                            target_index=slates.get("target_index"),
                            grades=slates.get("grades"))
  return np.asarray(out["has_signal"], bool)


def shape_rewards(total, lengths, finished, max_len: int, buffer: int, invalid_penalty: float):
  """float32 [N]: rewards after DAPO's overlong handling.

  An answer cut at the token budget (not finished) never keeps its reward: it gets the hard
  `invalid_penalty`, as an invalid answer does. With buffer > 0 a finished answer longer than
  max_len - buffer also gets the soft ramp, 0 down to -1 at max_len.
  """
  total = np.asarray(total, np.float32)
  if buffer:
    total = total + np.asarray(losses.overlong_penalty(lengths, max_len, buffer))
  return np.where(np.asarray(finished, bool), total, invalid_penalty).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class UpdatePlan:
  """Which groups an update trains on, with their advantages."""
  advantages: np.ndarray  # float32 [P, G]
  keep: np.ndarray  # bool [P]: groups that carry signal (and reward variance, if dynamic)
  selected: np.ndarray  # int [train_groups]: kept groups first, then filler
  selected_valid: np.ndarray  # bool [train_groups]: False for the filler (masked out)


def plan_update(rewards, has_signal, alg: AlgorithmConfig, train_groups: int) -> UpdatePlan:
  """Group advantages and the fixed-size choice of groups for one update.

  rewards: float [P, G]; has_signal: bool [P] (slates the reward can rank). Groups without
  signal never train; with dynamic sampling, neither do groups whose rewards are all equal.
  """
  rewards = np.asarray(rewards, np.float32)
  adv = np.asarray(ADVANTAGES.get(alg.advantage)(rewards), np.float32)
  keep = np.asarray(has_signal, bool)
  if alg.dynamic_sampling:
    keep = keep & np.asarray(adv_lib.group_keep_mask(rewards))
  sel, valid = adv_lib.select_groups({"idx": np.arange(len(rewards))}, keep, train_groups)
  return UpdatePlan(advantages=adv, keep=keep, selected=np.asarray(sel["idx"]),
                    selected_valid=np.asarray(valid))


def update_rows(prompts, responses, logps, plan: UpdatePlan, group_size: int, width: int,
                pad_id: int, ref_logps_fn: Optional[callable] = None):
  """Training rows of the selected groups (`learner.build_rows` plus advantages).

  prompts, responses, logps: per rollout, row p * G + g being sample g of prompt p. Filler
  groups get an empty mask and zero advantage. ref_logps_fn(rows) -> [N, T], when given, adds
  the reference policy's log-probs (`logp_ref`) for the KL term.
  """
  idx = (plan.selected[:, None] * group_size + np.arange(group_size)).ravel()
  valid_rows = np.repeat(plan.selected_valid, group_size)
  rows = learner.build_rows([prompts[i] for i in idx], [responses[i] for i in idx],
                            [logps[i] for i in idx], width, pad_id)
  rows["mask"] &= valid_rows[:, None]
  rows["advantages"] = np.where(valid_rows, plan.advantages.ravel()[idx], 0.0).astype(np.float32)
  if ref_logps_fn is not None:
    rows["logp_ref"] = ref_logps_fn(rows)
  return rows
