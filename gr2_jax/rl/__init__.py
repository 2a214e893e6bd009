"""RL with verifiable re-ranking rewards: pure, jittable rewards, advantages and losses.

Importing the package registers every variant; look them up by name:
`registry.REWARDS.get("rank_promotion")`, `ADVANTAGES`, `POLICY_LOSSES`, `LOSS_AGGREGATIONS`,
`KL_ESTIMATORS`. `algorithm.ALGORITHMS` holds the GRPO / Dr.GRPO / DAPO / GSPO settings.
"""

from gr2_jax.rl import advantages
from gr2_jax.rl import diagnostics
from gr2_jax.rl import losses
from gr2_jax.rl import registry
from gr2_jax.rl import rewards
