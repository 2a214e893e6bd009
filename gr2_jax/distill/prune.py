"""Depth pruning: a student that keeps some of a decoder's layers (the rest of its parameters
copied), the starting point of the pruned-student OPD recipe."""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp

from gr2_jax.errors import UserError
from gr2_jax.parallel import mesh as mesh_lib


def layers_to_keep(spec, num_layers):
  """Layer indices a spec keeps, ascending.

  spec: "every_other" (0, 2, 4, ...: half the layers, rounded up), "first_last:K" (the first K
  and the last K), or explicit indices "0,1,5".
  """
  spec = str(spec).strip()
  if spec == "every_other":
    keep = list(range(0, num_layers, 2))
  elif spec.startswith("first_last:"):
    try:
      k = int(spec.split(":", 1)[1])
    except ValueError:
      raise UserError(f"keep_layers {spec!r}: first_last needs an integer, e.g. first_last:2")
    if k < 1 or 2 * k > num_layers:
      raise UserError(f"keep_layers {spec!r}: need 1 <= K <= {num_layers // 2} for "
                      f"{num_layers} layers")
    keep = list(range(k)) + list(range(num_layers - k, num_layers))
  else:
    try:
      keep = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
      raise UserError(f"keep_layers {spec!r}: use every_other, first_last:K or indices "
                      "like 0,2,3") from None
  if not keep or keep[0] < 0 or keep[-1] >= num_layers:
    raise UserError(f"keep_layers {spec!r} names no layer or one outside 0..{num_layers - 1}")
  if len(keep) == num_layers:
    raise UserError(f"keep_layers {spec!r} keeps all {num_layers} layers: nothing is pruned")
  return keep


def prune(model, keep, mesh=None, rules=None):
  """A new model with decoder layers `keep` of `model` (in order) and every other parameter
  copied; its config has num_layers = len(keep)."""
  cfg = dataclasses.replace(model.cfg, num_layers=len(keep))
  mesh = mesh or mesh_lib.single_device_mesh()
  student = mesh_lib.create_sharded_model(cfg, mesh, rules)
  # Copies: the student's buffers must not be the teacher's (a train step donates them).
  params = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model)))
  layers = params["layers"]
  params["layers"] = {i: layers[k] for i, k in enumerate(keep)}
  nnx.update(student, params)
  return student
