"""The RL policy update: rollouts as training rows, and one pure jitted optimiser step.

A rollout row is the prompt followed by the sampled response, right-padded to a fixed width.
Position t predicts token t + 1; `mask[t]` is True where token t + 1 is a response token (the
stop token included), so the loss sees exactly the tokens the policy chose. `logp_old[t]` is
the rollout policy's log-probability of that token.

Temperature: rollouts sampled at temperature T carry log-probs of softmax(logits / T) (see
`gr2_jax.sampling.sampler`), so the update divides its logits by the same T
(`LossConfig.temperature`, the verl convention) and the PPO ratio compares pi_theta and the
behaviour policy at the same temperature: exactly 1 on policy. The KL reference log-probs
(`sequence_logps`) take the same temperature.

The step maps (state, batch) -> (state, metrics) with the state donated, like the trainer's.
It is skipped (state returned unchanged, `skipped` = 1 in the metrics) when the loss or a
gradient is not finite or when no token carries an advantage (every rollout invalid, every
group without reward variance): a bad batch never turns into a silent NaN update.
"""

import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gr2_jax.errors import UserError
from gr2_jax.models import qwen3
from gr2_jax.parallel import sharding as sharding_lib
from gr2_jax.rl import losses
from gr2_jax.rl.registry import POLICY_LOSSES
from gr2_jax.train import optim

ROW_FIELDS = ("tokens", "positions", "segment_ids", "targets", "mask", "logp_old",
              "advantages")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static settings of the policy loss (a change recompiles the step)."""
  policy_loss: str = "ppo_clip"
  eps_low: float = 0.2
  eps_high: float = 0.28
  clip_ratio_c: float = 0.0  # dual-clip bound for negative advantages (0 = off)
  aggregation: str = "token_mean"
  kl_beta: float = 0.0
  kl_estimator: str = "k3"
  max_len: int = 0  # response budget, for the seq_mean_token_sum_norm aggregation
  temperature: float = 1.0  # the rollouts' sampling temperature; logits are divided by it

  def __post_init__(self):
    if not self.temperature > 0:
      raise UserError(f"temperature={self.temperature} must be > 0 (the rollouts' sampling "
                      "temperature)")


def build_rows(prompts, responses, response_logps, width, pad_id):
  """Training rows of (prompt, response) pairs.

  Args:
    prompts: list of prompt id lists.
    responses: list of response id lists (the stop token included when emitted).
    response_logps: list of per-token rollout log-probs, aligned with `responses`.
    width: row length; must hold the longest prompt + response.
  Returns {tokens, positions, segment_ids, targets, mask, logp_old} as numpy [N, width].
  """
  n = len(prompts)
  out = {
      "tokens": np.full((n, width), pad_id, np.int32),
      "positions": np.tile(np.arange(width, dtype=np.int32), (n, 1)),
      "segment_ids": np.zeros((n, width), np.int32),
      "targets": np.full((n, width), pad_id, np.int32),
      "mask": np.zeros((n, width), bool),
      "logp_old": np.zeros((n, width), np.float32),
  }
  for i, (p, r, lp) in enumerate(zip(prompts, responses, response_logps)):
    seq = list(p) + list(r)
    if len(seq) > width:
      raise ValueError(f"row {i} has {len(seq)} tokens but the width is {width}")
    out["tokens"][i, :len(seq)] = seq
    out["segment_ids"][i, :len(seq)] = 1
    out["targets"][i, :len(seq) - 1] = seq[1:]
    start = len(p) - 1
    out["mask"][i, start:start + len(r)] = True
    out["logp_old"][i, start:start + len(r)] = np.asarray(lp, np.float32)[:len(r)]
  return out


def token_logps(graphdef, params, batch, temperature=1.0):
  """float32 [B, T]: log softmax(logits / temperature)[targets[t]] given tokens[:t + 1].

  The log-softmax runs over chunks of positions (`qwen3.token_logps`), so the step never holds
  [B, T, V] logits.
  """
  return qwen3.token_logps(graphdef, params, batch["tokens"], batch["positions"],
                           batch["targets"], segment_ids=batch["segment_ids"],
                           temperature=temperature)


def policy_loss(graphdef, params, batch, cfg: LossConfig):
  """(loss, metrics) of the configured policy loss on one batch of rows."""
  logp = token_logps(graphdef, params, batch, cfg.temperature)
  fn = POLICY_LOSSES.get(cfg.policy_loss)
  return fn(logp, batch["logp_old"], batch["advantages"], batch["mask"],
            logp_ref=batch.get("logp_ref"), eps_low=cfg.eps_low, eps_high=cfg.eps_high,
            clip_ratio_c=cfg.clip_ratio_c,
            kl_beta=cfg.kl_beta, kl_estimator=cfg.kl_estimator, aggregation=cfg.aggregation,
            max_len=cfg.max_len or None)


def make_rl_step(graphdef, tx, schedule, cfg: LossConfig, frozen_layers=0):
  """The pure step (state, batch) -> (state, metrics); see the module docstring. With
  `frozen_layers` (the optimiser's `OptimConfig.frozen_layers`) no gradient is computed for the
  frozen parameters."""

  def step_fn(state, batch):
    params = state["params"]
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: policy_loss(graphdef, optim.stop_frozen(p, frozen_layers), batch, cfg),
        has_aux=True)(params)
    signal = jnp.sum(jnp.asarray(batch["mask"], bool)
                     & (jnp.abs(batch["advantages"]) > 0)[:, None])
    ok = losses.finite_or_skip(loss, grads, num_valid=signal)
    return _guarded_update(tx, schedule, state, grads, ok, signal, dict(metrics, loss=loss))

  return step_fn


def _guarded_update(tx, schedule, state, grads, ok, signal, metrics):
  """The optimiser update where `ok`, else the state unchanged (bit-identical), with the step's
  metrics: gradient norm, learning rate, skipped (0 / 1) and the tokens that carried signal."""
  params = state["params"]
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  new = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
         "step": state["step"] + 1}
  new = losses.select_if(ok, new, state)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]),
                 skipped=1.0 - ok.astype(jnp.float32), signal_tokens=signal.astype(jnp.float32))
  return new, metrics


def check_teacher(student_cfg, teacher_cfg, student_tok=None, teacher_tok=None):
  """One clear error, before any compute, when the teacher cannot score the student's tokens."""
  if student_cfg.vocab_size != teacher_cfg.vocab_size:
    raise UserError(f"the teacher's vocabulary ({teacher_cfg.vocab_size} tokens) differs from the "
                    f"student's ({student_cfg.vocab_size}); distillation needs one tokenizer")
  if student_tok is not None and teacher_tok is not None:
    vs, vt = student_tok.vocab_size, teacher_tok.vocab_size
    if vs != vt or any(student_tok.id_to_token(i) != teacher_tok.id_to_token(i)
                       for i in range(vs)):
      raise UserError("the teacher's tokenizer differs from the student's; distillation needs "
                      "one tokenizer")


def distill_stats(graphdef, params, teacher_graphdef, teacher_params, batch, temperature=1.0,
                  full=True, chunk=128):
  """(logp, teacher_logp, kl) [B, T] of rows under the student and the frozen teacher, in one
  pass: the teacher's parameters go through stop_gradient (it never trains)."""
  student = nnx.merge(graphdef, params)
  teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(teacher_params))
  kw = dict(segment_ids=batch["segment_ids"])
  xs, _ = student.hidden(batch["tokens"], batch["positions"], **kw)
  xt, _ = teacher.hidden(batch["tokens"], batch["positions"], **kw)
  logp, logq, kl = qwen3.chunked_distill_stats(xs, student.logits, jax.lax.stop_gradient(xt),
                                                teacher.logits, batch["targets"], chunk,
                                                temperature, full)
  return logp, jax.lax.stop_gradient(logq), kl


def opd_loss(graphdef, params, teacher_graphdef, teacher_params, batch, cfg: LossConfig):
  """(loss, metrics) of `losses.opd` with the teacher's log-probs computed in the same pass, or,
  with `teacher_graphdef` None, read from `batch["logp_ref"]` (a teacher on its own devices,
  `teacher_logps`; sampled-token estimators only)."""
  full = cfg.kl_estimator == "full"
  if teacher_graphdef is None:
    if full:
      raise UserError("kl_estimator 'full' needs the teacher in the student's pass; use k1 or "
                      "k3 with a teacher on its own devices")
    logp, logq, kl = token_logps(graphdef, params, batch, cfg.temperature), batch["logp_ref"], None
  else:
    logp, logq, kl = distill_stats(graphdef, params, teacher_graphdef, teacher_params, batch,
                                   cfg.temperature, full)
  return POLICY_LOSSES.get("opd")(
      logp, batch["logp_old"], batch["advantages"], batch["mask"], logp_ref=logq,
      kl_full=kl if full else None, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
      clip_ratio_c=cfg.clip_ratio_c, kl_beta=cfg.kl_beta, kl_estimator=cfg.kl_estimator,
      aggregation=cfg.aggregation, max_len=cfg.max_len or None)


def make_opd_step(graphdef, teacher_graphdef, tx, schedule, cfg: LossConfig, frozen_layers=0):
  """The pure OPD step (state, teacher_params, batch) -> (state, metrics).

  Like `make_rl_step`, but every response token carries signal (the KL), so only a non-finite
  loss or gradient (a NaN or infinite KL included) or an empty batch skips the update; the
  teacher's parameters are an input, never part of the optimiser state.
  """

  def step_fn(state, teacher_params, batch):
    params = state["params"]
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: opd_loss(graphdef, optim.stop_frozen(p, frozen_layers), teacher_graphdef,
                           teacher_params, batch, cfg), has_aux=True)(params)
    signal = jnp.sum(jnp.asarray(batch["mask"], bool))
    ok = losses.finite_or_skip(loss, grads, num_valid=signal)
    ok = ok & jnp.isfinite(metrics["kl_teacher"])
    return _guarded_update(tx, schedule, state, grads, ok, signal, dict(metrics, loss=loss))

  return step_fn


def teacher_logps(teacher_graphdef, teacher_params, rows, temperature, teacher_mesh,
                  student_mesh):
  """The teacher's per-token log-probs [N, T] of numpy rows, computed on `teacher_mesh` (the
  teacher's own devices, rows split over its "data" axis) and moved to `student_mesh`,
  replicated, for the student's step."""
  put = lambda mesh, x, spec: jax.device_put(jnp.asarray(x), jax.sharding.NamedSharding(mesh,
                                                                                        spec))
  n = np.shape(rows["tokens"])[0]
  data = teacher_mesh.shape["data"]
  row_spec = (jax.sharding.PartitionSpec("data") if n % data == 0
              else jax.sharding.PartitionSpec())
  batch = {k: put(teacher_mesh, rows[k], row_spec)
           for k in ("tokens", "positions", "segment_ids", "targets")}
  with sharding_lib.use_rules(teacher_mesh):  # the teacher's activations on its own devices
    logq = _logps_jit(teacher_graphdef, teacher_params, batch, float(temperature))
  return jax.device_put(logq, jax.sharding.NamedSharding(student_mesh,
                                                         jax.sharding.PartitionSpec()))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _logps_jit(graphdef, params, batch, temperature):
  return token_logps(graphdef, params, batch, temperature)


def sequence_logps(graphdef, params, rows, temperature=1.0):
  """Per-token log-probs [N, T] of numpy rows under params (e.g. the reference policy).

  temperature: the rollouts' sampling temperature, as in `LossConfig.temperature`.
  """
  batch = {k: jnp.asarray(rows[k]) for k in ("tokens", "positions", "segment_ids", "targets")}
  return np.asarray(sharding_lib.to_host(_logps_jit(graphdef, params, batch, float(temperature))))
