"""Name -> function registries: algorithm variants are config data, not code forks.

A config names its reward, advantage estimator, policy loss, loss aggregation and KL estimator;
the driver looks each up here, so GRPO, Dr.GRPO, DAPO and GSPO differ only by a config dict
(see `ALGORITHMS`).
"""

from typing import Callable, Dict, List

from gr2_jax.errors import UserError


class Registry:
  """A named table of functions of one kind (e.g. "reward")."""

  def __init__(self, kind: str):
    self.kind = kind
    self._fns: Dict[str, Callable] = {}

  def register(self, name: str) -> Callable[[Callable], Callable]:
    """Decorator that registers a function under `name` and returns it unchanged."""

    def decorator(fn: Callable) -> Callable:
      if name in self._fns:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._fns[name] = fn
      return fn

    return decorator

  def get(self, name: str) -> Callable:
    """The function registered as `name`; a UserError naming the valid choices otherwise."""
    try:
      return self._fns[name]
    except (KeyError, TypeError):
      raise UserError(f"unknown {self.kind} {name!r}: choose one of "
                      f"{', '.join(self.names())}") from None

  def names(self) -> List[str]:
    return sorted(self._fns)

  def __contains__(self, name) -> bool:
    return name in self._fns


REWARDS = Registry("reward")
ADVANTAGES = Registry("advantage estimator")
POLICY_LOSSES = Registry("policy loss")
LOSS_AGGREGATIONS = Registry("loss aggregation")
KL_ESTIMATORS = Registry("KL estimator")

# Reference settings of the algorithm family; a config starts from one and overrides fields.
# dynamic_sampling: drop groups whose rewards have zero variance (`advantages.group_keep_mask`).
ALGORITHMS = {
    "grpo": dict(advantage="grpo", policy_loss="ppo_clip", eps_low=0.2, eps_high=0.2,
                 aggregation="seq_mean_token_mean", kl_beta=0.04, kl_estimator="k3",
                 dynamic_sampling=False, overlong_buffer=0),
    "dr_grpo": dict(advantage="dr_grpo", policy_loss="ppo_clip", eps_low=0.2, eps_high=0.2,
                    aggregation="seq_mean_token_sum_norm", kl_beta=0.0, kl_estimator="k3",
                    dynamic_sampling=False, overlong_buffer=0),
    "dapo": dict(advantage="grpo", policy_loss="ppo_clip", eps_low=0.2, eps_high=0.28,
                 aggregation="token_mean", kl_beta=0.0, kl_estimator="k3",
                 dynamic_sampling=True, overlong_buffer=64),
    "gspo": dict(advantage="grpo", policy_loss="gspo", eps_low=3e-4, eps_high=4e-4,
                 aggregation="seq_mean_token_mean", kl_beta=0.0, kl_estimator="k3",
                 dynamic_sampling=False, overlong_buffer=0),
}


def algorithm(name: str) -> dict:
  """A copy of the reference settings of algorithm `name` (see `ALGORITHMS`)."""
  if name not in ALGORITHMS:
    raise UserError(f"unknown RL algorithm {name!r}: choose one of {', '.join(sorted(ALGORITHMS))}")
  return dict(ALGORITHMS[name])
