"""Attention routing: a loss on where one layer's heads look, added to the token loss.

A re-ranker that answers with the candidates' numbers must, at each number it writes, read the
candidate it chooses. SmolLM2's lower layers hold each candidate's standing at the end of its
prompt line (a linear scorer there finds the CF teacher's choice), but a few hundred SFT steps
on the answer tokens alone do not teach the upper layers to look there (BENCHMARKS.md,
"probe_choice"). This loss does: for a position that predicts a number of the answer, the
query heads of one KV group of one layer should attend to the last token of that candidate's
line. With the number repeated at the line's end (`PromptConfig.number_again`) that token is
the number itself, so a head that looks there can copy it.

The packed rows carry a `route` field (`packing.pack`'s pointers): at a query position, the row
position its heads should attend to, -1 elsewhere. The loss per routed query is the mean over
the group's heads of -log attention(query -> target), i.e. minus the log of the geometric mean
of the heads' attention on it; its sum, times `weight`, joins the sum of weighted token NLLs, and
the step divides both by the token weights as usual.
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp

from gr2_jax.errors import UserError
from gr2_jax.models import qwen3
from gr2_jax.train import trainer as trainer_lib

FIELD = "route"


def resolve_layer(model_cfg, layer, frozen_layers):
  """The routed layer's index (-1 = the last); it must be one the optimiser trains."""
  n = model_cfg.num_layers
  resolved = n - 1 if layer == -1 else int(layer)
  if not frozen_layers <= resolved < n:
    raise UserError(f"route_layer {layer} must be a trained layer ({frozen_layers}..{n - 1}, "
                    f"or -1 for the last): the frozen ones cannot learn where to look")
  return resolved


def check_group(model_cfg, group):
  if not 0 <= group < model_cfg.num_kv_heads:
    raise UserError(f"route_group {group} must name a KV group of the model "
                    f"(0..{model_cfg.num_kv_heads - 1})")


def _picked(attn_logp, route, group):
  """Group `group`'s heads' attention log-probabilities at the routed positions, f32 [B, G, T]
  (0 where not routed), and the routed mask [B, T]."""
  a = attn_logp[:, group]  # [B, G, T, S]
  on = route >= 0
  idx = jnp.broadcast_to(jnp.where(on, route, 0)[:, None, :, None], a.shape[:3] + (1,))
  picked = jnp.take_along_axis(a, idx, axis=-1)[..., 0]
  return jnp.where(on[:, None], picked, 0.0), on


def route_nll(attn_logp, route, group):
  """(sum over routed queries of the mean over group `group`'s heads of -log attention to the
  routed position, number of routed queries).

  attn_logp: f32 [B, KVH, G, T, S] (`Qwen3.hidden_and_attention`); route: int32 [B, T] of key
  positions, -1 = not routed.
  """
  picked, on = _picked(attn_logp, route, group)
  return -jnp.sum(jnp.mean(picked, axis=1)), jnp.sum(on).astype(jnp.float32)


def first_routed(route, segment_ids):
  """bool [B, T]: the first routed query of each packed example (the position that predicts
  the answer's first number, the re-ranker's choice)."""
  on = route >= 0
  start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                           segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  count = jnp.cumsum(on, axis=1)
  # Routed queries before each example's start, carried along the example (counts only grow).
  before = jax.lax.cummax(jnp.where(start, count - on, 0), axis=1)
  return on & (count - before == 1)


def _parts(graphdef, params, batch, layer, loss_chunk):
  """(token NLL sum, token weight sum, attention log-probs of `layer`, per-token target
  log-probs [B, T]) of one batch."""
  model = nnx.merge(graphdef, params)
  x, attn = model.hidden_and_attention(batch["tokens"], batch["positions"], layer,
                                       segment_ids=batch["segment_ids"])
  logp = qwen3.chunked_token_logps(x, model.logits, batch["targets"], loss_chunk)
  w = batch["weights"].astype(jnp.float32)
  return -jnp.sum(logp * w), jnp.sum(w), attn, logp


def routed_token_loss(graphdef, params, batch, *, layer, weight, group=0,
                      loss_chunk=trainer_lib.LOSS_CHUNK):
  """(sum of weighted token NLLs + weight * sum of routed queries' NLLs, sum of token weights)
  of one [B, T] batch: `trainer.token_loss` with the routing term."""
  nll, w, attn, _ = _parts(graphdef, params, batch, layer, loss_chunk)
  r_sum, _ = route_nll(attn, batch[FIELD], group)
  return nll + weight * r_sum, w


def objective(model_cfg, *, layer, weight, group=0, frozen_layers=0,
              loss_chunk=trainer_lib.LOSS_CHUNK):
  """A `trainer.Objective` of the token loss plus the routing term (counts, throughput and MFU
  as the plain token loss's)."""
  loss = functools.partial(routed_token_loss, layer=layer, weight=weight, group=group,
                           loss_chunk=loss_chunk)
  return trainer_lib.Objective(
      loss=loss, fields=trainer_lib.DEVICE_FIELDS + (FIELD,), count=trainer_lib.count_tokens,
      unit="tokens", flops=functools.partial(trainer_lib.token_step_flops, model_cfg,
                                             frozen_layers=frozen_layers))


def make_diagnostics(graphdef, *, layer, group=0, loss_chunk=trainer_lib.LOSS_CHUNK):
  """A jitted (params, batch [B, T]) -> (token NLL sum, token weight sum, routed NLL sum, routed
  queries, sum over routed queries of the group's mean attention on the routed position, NLL sum
  of the answers' first numbers, their count, sum of their probabilities)."""

  @jax.jit
  def stats(params, batch):
    nll, w, attn, logp = _parts(graphdef, params, batch, layer, loss_chunk)
    r_sum, r_n = route_nll(attn, batch[FIELD], group)
    picked, on = _picked(attn, batch[FIELD], group)
    mass = jnp.sum(jnp.where(on, jnp.mean(jnp.exp(picked), axis=1), 0.0))
    first = first_routed(batch[FIELD], batch["segment_ids"])
    f_nll = -jnp.sum(jnp.where(first, logp, 0.0))
    f_prob = jnp.sum(jnp.where(first, jnp.exp(logp), 0.0))
    return nll, w, r_sum, r_n, mass, f_nll, jnp.sum(first).astype(jnp.float32), f_prob

  return stats
