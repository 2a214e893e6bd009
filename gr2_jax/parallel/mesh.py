"""Device mesh and sharded model construction."""

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh

from gr2_jax.errors import UserError
from gr2_jax.parallel import sharding as sharding_lib


def make_mesh(shape=(1, 1, 1), devices=None, axis_names=sharding_lib.MESH_AXES):
  """A (data, fsdp, tensor) mesh with Auto axis types; -1 in `shape` takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(axis_names):
    raise UserError(f"mesh shape {tuple(shape)} needs one size per axis {axis_names}")
  if shape.count(-1) > 1:
    raise UserError(f"mesh shape {tuple(shape)} may hold at most one -1")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    shape[shape.index(-1)] = len(devices) // max(known, 1)
  if math.prod(shape) != len(devices):
    raise UserError(
        f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices but {len(devices)} are "
        "given; change the mesh shape in the config")
  grid = np.array(devices, dtype=object).reshape(shape)
  return Mesh(grid, tuple(axis_names), axis_types=(AxisType.Auto,) * len(axis_names))


def data_parallel_mesh(num_devices=0):
  """A (devices, 1, 1) mesh over the first `num_devices` of this process's devices (0 = all)."""
  devices = jax.local_devices()
  if num_devices:
    devices = devices[:num_devices]
  return make_mesh((len(devices), 1, 1), devices=devices)


def single_device_mesh(device=None):
  """A (1, 1, 1) mesh on one device (default: this process's first), for code that always
  wants a mesh."""
  return make_mesh((1, 1, 1), devices=[device or jax.local_devices()[0]])


def outside_mesh():
  """Context with no mesh and no rules: code that builds, restores or runs modules of its own
  (the SASRec baseline) inside a stage's `Runtime.activate()`."""
  return sharding_lib.no_rules()


def abstract_model(build_fn):
  """(graphdef, abstract state) of the module `build_fn()` makes, without allocating it.

  Traced with no mesh in context: under one (`sharding.use_rules`), nnx would read the
  parameters' logical axis names as mesh axes; the shardings come from the rules instead.
  """
  with outside_mesh():
    return nnx.split(nnx.eval_shape(build_fn))


def create_sharded(build_fn, mesh, rules=None):
  """Builds `build_fn()` inside jit with out_shardings from the params' logical axes.

  Every parameter is created directly on its shards; no device ever holds a full copy of a
  sharded parameter.
  """
  graphdef, abs_state = abstract_model(build_fn)
  shardings = sharding_lib.state_shardings(abs_state, mesh, rules)

  def init():
    return nnx.state(build_fn())

  with sharding_lib.use_rules(mesh, rules):
    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def create_sharded_model(cfg, mesh, rules=None, seed=0):
  """A randomly initialised Qwen3 model whose parameters are sharded over `mesh` by `rules`."""
  from gr2_jax.models import qwen3  # pylint: disable=g-import-not-at-top  (models import parallel)
  return create_sharded(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(seed)), mesh, rules)


def reshard_model(model, mesh, rules=None):
  """Places an existing model's parameters on `mesh` as `rules` say (device_put per leaf)."""
  graphdef, state = nnx.split(model)
  shardings = sharding_lib.state_shardings(state, mesh, rules)
  if jax.process_count() > 1:
    # Across processes a host value goes in (the same on every process); each process puts
    # its own shards.
    state = jax.tree.map(lambda x: np.asarray(x) if getattr(x, "is_fully_addressable", True)
                         else x, state)
  state = jax.tree.map(jax.device_put, state, shardings)
  return nnx.merge(graphdef, state)
