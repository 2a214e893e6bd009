"""Name -> function registries: algorithm variants are config data, not code forks.

A config names its reward, advantage estimator, policy loss, loss aggregation and KL estimator;
the driver looks each up here, so GRPO, Dr.GRPO, DAPO and GSPO differ only by config data
(`gr2_jax.rl.algorithm.ALGORITHMS`).
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
# The context compressor's rewards (`gr2_jax.compress.rewards`): summary -> score.
COMPRESS_REWARDS = Registry("compression reward")
